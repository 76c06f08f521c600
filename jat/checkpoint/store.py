"""Atomic, checksummed checkpoints in safetensors, with the full config in every one.

A checkpoint is a directory `ckpt-00001000/`:
    weights.safetensors    model.*, ema.*, norm.* tensors; metadata: config (JSON), step, and the
                           checksums sha256.model, sha256.ema, sha256.norm (one per prefix, so a
                           reader of the EMA weights verifies only what it reads); LoRA runs also
                           base_sha256, the identity of the base the adapter was trained on
    optimizer.safetensors  optimizer state tensors; metadata: param groups and layout (JSON), sha256
    rng-<rank>.safetensors each process's CPU (and CUDA) RNG state; metadata: sha256
    adapter.safetensors    LoRA runs: the EMA adapter on its own (jat/model/lora.py); metadata: sha256
    state.json             step, scheduler state, counters, validation metric

Every checksum is `tensors_sha256` of the tensors the file holds, written into the file's own
metadata (so weights.safetensors alone is enough for inference) and recomputed from the tensors
as read back at load: a flipped byte is a CheckpointError naming the file, not a silently different
model. Files written before checksums existed load with a warning. A checkpoint's identity, the one
an adapter records of its base, is its sha256.ema (`weights_sha256`).

It is written under a temporary name and renamed when complete, so a directory named `ckpt-*`
is always whole: a run killed mid-write leaves only a `.tmp-*` directory, removed on the next
save. Weights holding NaN or inf are refused on load (and never saved: jat/train/trainer.py). The output
folder also holds `.lock`, the run lock of the training using it (jat/train/runlock.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jat.config import Config

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt-(\d{8})$")
WEIGHT_PREFIXES = ("model", "ema", "norm")  # the tensor groups of a weights file, checksummed apart


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


CHECKSUM_KEY = "sha256"  # metadata key of a file's checksum; "sha256.<prefix>": that prefix's tensors
_unchecked_warned: set[str] = set()  # files without a checksum already warned about


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The checksum of a set of tensors, the one every writer stores and every reader verifies:
    sha256 over, in name order, each tensor's name, dtype and shape, then its raw bytes (exactly the
    bytes safetensors stores for it)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _checksum_key(prefix: str | None) -> str:
    return CHECKSUM_KEY if prefix is None else f"{CHECKSUM_KEY}.{prefix}"


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None, groups: tuple[str, ...] = ()) -> None:
    """Write a safetensors file with its checksum in the metadata, and fsync it.

    With `groups` (prefixes, e.g. model/ema/norm) each prefix's tensors get their own checksum
    `sha256.<prefix>` instead of one for the file, so a partial reader verifies what it reads.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata or {})
    if groups:
        for g in groups:
            group = {k: v for k, v in tensors.items() if k.startswith(g + ".")}
            meta[_checksum_key(g)] = tensors_sha256(group)
    else:
        meta[_checksum_key(None)] = tensors_sha256(tensors)
    save_file(tensors, str(path), metadata=meta)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def read_tensors(path: str | Path,
                 prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file (only those under `prefix.`, names kept) and its metadata,
    verified against the stored checksum. Raises CheckpointError naming the file when it is unreadable
    or corrupt; a file without a checksum (written before they existed) loads with a warning."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = [k for k in f.keys() if prefix is None or k.startswith(prefix + ".")]
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    stored = meta.get(_checksum_key(prefix))
    if stored is None:
        if str(path) not in _unchecked_warned:
            _unchecked_warned.add(str(path))
            log.warning("%s: no checksum stored (written by an older version): loaded unverified", path)
    else:
        computed = tensors_sha256(tensors)
        if computed != stored:
            part = f"{prefix} tensors: " if prefix else ""
            raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt ({part}stored sha256 "
                                  f"{stored[:16]}..., computed {computed[:16]}...)")
    return tensors, meta


def non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, else None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


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


def resolve_checkpoint(name: str | Path) -> str | Path:
    """What a `--checkpoint` argument names: a run folder becomes its newest checkpoint; a checkpoint
    folder, a weights file or a Hub name (`hf://org/name`, kept as the string given) stays as it is."""
    p = Path(name)
    if p.is_dir() and not (p / "weights.safetensors").exists():
        return latest_checkpoint(p) or name
    return name


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
    """A weights file: `model.`, `ema.` and `norm.` tensors with the config, step and one checksum per
    prefix as metadata."""
    meta = {"config": json.dumps(cfg.to_dict()), "step": str(step), "format": "jat-checkpoint-1",
            **(extra_meta or {})}
    tensors = {f"model.{k}": v for k, v in model.items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    tensors.update({f"norm.{k}": v for k, v in norm.items()})
    save_tensors(tensors, path, meta, groups=WEIGHT_PREFIXES)


def write_main(tmp: Path, *, cfg: Config, step: int, model: dict[str, torch.Tensor],
               ema: dict[str, torch.Tensor], norm: dict[str, torch.Tensor], optimizer: dict[str, Any],
               state: dict[str, Any], extra_meta: dict[str, str] | None = None) -> None:
    """Write the weights (with `extra_meta`), optimizer and state files of one checkpoint into `tmp`."""
    write_weights(tmp / "weights.safetensors", cfg=cfg, step=step, model=model, ema=ema, norm=norm,
                  extra_meta=extra_meta)
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors", {"meta": json.dumps(opt_meta)})
    with open(tmp / "state.json", "w") as f:
        json.dump({"step": step, **state}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_rng(tmp: Path, rank: int) -> None:
    save_tensors(rng_state(), tmp / f"rng-{rank}.safetensors")


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


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a checkpoint's weights file (config, step, checksums), without its tensors."""
    wf = weights_file(path)
    try:
        with safe_open(str(wf), "pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{wf}: unreadable checkpoint ({exc})") from None


def read_config(path: str | Path) -> Config:
    """The config stored in a checkpoint."""
    wf = weights_file(path)
    meta = read_metadata(wf)
    if "config" not in meta:
        raise CheckpointError(f"{wf}: no config stored in this checkpoint")
    return Config.from_dict(json.loads(meta["config"]), source=str(wf))


def weights_sha256(path: str | Path) -> str | None:
    """A checkpoint's identity: the stored checksum of its EMA weights (None for older checkpoints).
    An adapter records its base's, so it is not applied to another base of the same shapes."""
    return read_metadata(path).get(_checksum_key("ema"))


def load_weights(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under `prefix.` (model, ema or norm) from a checkpoint, prefix removed; verified
    against their checksum and refused if any holds NaN or inf."""
    wf = weights_file(path)
    # read only this prefix's tensors, not the whole file (model + EMA + norm)
    tensors, _ = read_tensors(wf, prefix)
    if not tensors:
        raise CheckpointError(f"{wf}: no '{prefix}' tensors in this checkpoint")
    bad = non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{wf}: tensor {bad} holds non-finite values")
    return {k[len(prefix) + 1:]: v for k, v in tensors.items()}


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                 against: str = "the stored config") -> None:
    """load_state_dict with a one-line CheckpointError naming what does not fit."""
    check_fits(module, state, what, against)
    module.load_state_dict(state)


def check_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
               against: str = "the stored config") -> None:
    """CheckpointError naming the missing, unexpected and misshapen tensors when `state` does not fit
    `module` (whose state may be sharded: a DTensor's shape is the whole tensor's)."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(x)} {name} (first: {x[0]})" for x, name in
                 ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape")) if x]
        raise CheckpointError(f"{what} do not fit {against}: {'; '.join(parts)}")


# settings that do not change what the weights mean: informational, memory-only, training-only
NOT_ARCHITECTURE = frozenset({"model.preset", "model.grad_checkpointing", "lora.dropout"})


def architecture_diff(stored: Config, current: Config) -> list[str]:
    """The model and lora settings that differ between a checkpoint's config and the current one,
    as 'model.depth 2 -> 3' (weights only fit the architecture they were trained with)."""
    diffs = []
    for section in ("model", "lora"):
        a, b = getattr(stored, section), getattr(current, section)
        for key, old in dataclasses.asdict(a).items():
            name, new = f"{section}.{key}", getattr(b, key)
            if name not in NOT_ARCHITECTURE and old != new:
                diffs.append(f"{name} {old} -> {new}")
    return diffs


def load_training_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """Everything a resumed run needs besides the weights; the tensor files verified."""
    state_file = ckpt / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None
    opt_tensors, opt_meta = read_tensors(ckpt / "optimizer.safetensors")
    opt = unflatten_optimizer(opt_tensors, json.loads(opt_meta["meta"]))
    rng_path = ckpt / f"rng-{rank}.safetensors"
    rng = read_tensors(rng_path)[0] if rng_path.is_file() else None
    return {"state": state, "optimizer": opt, "rng": rng}
