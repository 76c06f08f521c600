"""Atomic checkpoints in safetensors, with the full config in every one.

A checkpoint is a directory `ckpt-00001000/`:
    weights.safetensors    model.*, ema.*, norm.* tensors; metadata: config (JSON), step
    optimizer.safetensors  optimizer state tensors; metadata: param groups and layout (JSON)
    rng-<rank>.safetensors each process's CPU (and CUDA) RNG state
    state.json             step, scheduler state, counters, validation metric

It is written under a temporary name and renamed when complete, so a directory named `ckpt-*`
is always whole: a run killed mid-write leaves only a `.tmp-*` directory, removed on the next
save. Inference needs `weights.safetensors` alone.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jat.config import Config

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                  metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# --- optimizer state <-> flat tensors ----------------------------------------------------------


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- RNG ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state(),
           "numpy": torch.frombuffer(bytearray(json.dumps(_np_state()).encode()), dtype=torch.uint8),
           "python": torch.frombuffer(bytearray(json.dumps(_py_state()).encode()), dtype=torch.uint8)}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- save / load -------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def begin_save(output_dir: str | Path, step: int) -> Path:
    """Create (fresh) the temporary directory a checkpoint is written into; main process only."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".old-ckpt-*"):  # killed while replacing a checkpoint: restore the old one
        final = root / old.name.removeprefix(".old-")
        if not final.exists():
            os.replace(old, final)
    for pattern in (".tmp-ckpt-*", ".old-ckpt-*", ".del-ckpt-*"):  # left by a run killed mid-write
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir(root, step)
    tmp.mkdir()
    return tmp


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    """The temporary directory step `step`'s checkpoint is written into before its atomic rename."""
    return Path(output_dir) / f".tmp-{checkpoint_name(step)}"


def write_weights(path: Path, *, cfg: Config, step: int, model: dict[str, torch.Tensor],
                  ema: dict[str, torch.Tensor], norm: dict[str, torch.Tensor],
                  extra_meta: dict[str, str] | None = None) -> None:
    """A weights file: `model.`, `ema.` and `norm.` tensors with the config and step as metadata."""
    meta = {"config": json.dumps(cfg.to_dict()), "step": str(step), "format": "jat-checkpoint-1",
            **(extra_meta or {})}
    tensors = {f"model.{k}": v for k, v in model.items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    tensors.update({f"norm.{k}": v for k, v in norm.items()})
    _save_tensors(tensors, path, meta)


def write_main(tmp: Path, *, cfg: Config, step: int, model: dict[str, torch.Tensor],
               ema: dict[str, torch.Tensor], norm: dict[str, torch.Tensor], optimizer: dict[str, Any],
               state: dict[str, Any]) -> None:
    """Write the weights, optimizer and state files of one checkpoint into `tmp`."""
    write_weights(tmp / "weights.safetensors", cfg=cfg, step=step, model=model, ema=ema, norm=norm)
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors", {"meta": json.dumps(opt_meta)})
    with open(tmp / "state.json", "w") as f:
        json.dump({"step": step, **state}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_rng(tmp: Path, rank: int) -> None:
    _save_tensors(rng_state(), tmp / f"rng-{rank}.safetensors")


def finish_save(tmp: Path) -> Path:
    """Rename the finished temporary directory to its final name (the atomic step)."""
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        old = tmp.parent / f".old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def prune(output_dir: str | Path, keep_last: int, keep: set[str] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, sparing the names in `keep`."""
    ckpts = list_checkpoints(output_dir)
    removed = []
    for path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if path.name not in keep:
            # rename first: a kill during the slow delete must not leave a half-deleted ckpt-*
            doomed = path.parent / f".del-{path.name}"
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed


def weights_file(path: str | Path) -> Path:
    """A checkpoint directory or its weights file -> the weights file, with a clear error."""
    p = Path(path)
    if p.is_dir():
        p = p / "weights.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{path}: no checkpoint here "
                              "(expected a ckpt-* directory or weights.safetensors)")
    return p


def read_config(path: str | Path) -> Config:
    """The config stored in a checkpoint."""
    wf = weights_file(path)
    try:
        with safe_open(str(wf), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{wf}: unreadable checkpoint ({exc})") from None
    if "config" not in meta:
        raise CheckpointError(f"{wf}: no config stored in this checkpoint")
    return Config.from_dict(json.loads(meta["config"]), source=str(wf))


def load_weights(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under `prefix.` (model, ema or norm) from a checkpoint, prefix removed."""
    wf = weights_file(path)
    try:  # read only this prefix's tensors, not the whole file (model + EMA + norm)
        with safe_open(str(wf), "pt") as f:
            out = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    except Exception as exc:
        raise CheckpointError(f"{wf}: unreadable checkpoint ({exc})") from None
    if not out:
        raise CheckpointError(f"{wf}: no '{prefix}' tensors in this checkpoint")
    return out


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with a one-line CheckpointError naming what does not fit."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(x)} {name} (first: {x[0]})" for x, name in
                 ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape")) if x]
        raise CheckpointError(f"{what} do not fit the stored config: {'; '.join(parts)}")
    module.load_state_dict(state)


def load_training_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """Everything a resumed run needs besides the weights."""
    state = json.loads((ckpt / "state.json").read_text())
    with safe_open(str(ckpt / "optimizer.safetensors"), "pt") as f:  # metadata and tensors in one open
        opt = unflatten_optimizer({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["meta"]))
    rng_path = ckpt / f"rng-{rank}.safetensors"
    rng = load_file(str(rng_path)) if rng_path.is_file() else None
    return {"state": state, "optimizer": opt, "rng": rng}
