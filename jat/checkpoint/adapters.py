"""Adapter files (docs/design.md section 6): a LoRA/QLoRA fine-tune's trainable tensors, its LoraConfig and
the identity of the base it was trained on, in one safetensors file.

An adapter file also records the block linears it adapts (`targets` in its metadata): with
`lora.select_fraction` (layers chosen by SNR) its LoraConfig comes back resolved, those names as
`targets` and no selection, so it applies to its base exactly as trained without ranking again.

An adapter file records its base's identity (`store.weights_sha256`: the checksum of the base's EMA
weights) and is refused on any other base, even one of the same shapes, unless forced. A LoRA-mode
training checkpoint serves as an adapter file too (its EMA or model adapter weights).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from jat.atomic import write_atomic
from jat.checkpoint import store as ckpt
from jat.config import LoraConfig
from jat.model.dit import JaT
from jat.model.lora import adapter_state_dict, apply_lora, is_adapter_key, load_adapter, lora_targets

ADAPTER_FORMAT = "jat-lora-1"

log = logging.getLogger(__name__)


def save_adapter(path: str | Path, model: JaT, cfg: LoraConfig, base: str | None = None,
                 state: dict[str, torch.Tensor] | None = None, base_sha256: str | None = None) -> Path:
    """Write the adapter (or `state`, e.g. EMA weights) to a safetensors file, atomically, with the
    LoRA and model configs, the names of the adapted block linears, the base checkpoint's path and
    identity (`base_sha256`; read from `base` when not given) and the file's checksum in its metadata."""
    path = Path(path)
    state = adapter_state_dict(model) if state is None else state
    if base_sha256 is None and base and Path(base).exists():
        base_sha256 = ckpt.weights_sha256(base)
    tensors = {k: v.detach().float() for k, v in state.items()}
    meta = {"format": ADAPTER_FORMAT, "lora": json.dumps(dataclasses.asdict(cfg)),
            "model": json.dumps(dataclasses.asdict(model.cfg)), "targets": json.dumps(lora_targets(model)),
            "base": base or "", "base_sha256": base_sha256 or ""}
    return write_atomic(path, lambda tmp: ckpt.save_tensors(tensors, tmp, meta))  # never a partial file


class AdapterFile(NamedTuple):
    """What an adapter file (or a LoRA training checkpoint) holds."""

    state: dict[str, torch.Tensor]  # the adapter tensors
    lora: LoraConfig  # resolved: layers chosen by SNR as explicit targets (select_fraction None)
    base: str | None  # the base checkpoint's path at training time, if recorded
    base_sha256: str | None  # the base's identity (checkpoint.weights_sha256), if recorded


def load_adapter_file(path: str | Path, ema: bool = True) -> AdapterFile:
    """An adapter file, or a LoRA-mode training checkpoint (its EMA or model adapter weights), verified
    against its checksum. Raises CheckpointError for anything else (e.g. an audio file)."""
    p = Path(path)
    if p.is_file() and p.name != "weights.safetensors":
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # not safetensors at all: safetensors' own error types
            raise ckpt.CheckpointError(f"{p}: not an adapter file ({exc})") from None
        if meta.get("format") != ADAPTER_FORMAT:
            raise ckpt.CheckpointError(f"{p}: not an adapter file (format {meta.get('format')!r}, "
                                       f"expected {ADAPTER_FORMAT!r})")
        state, _ = ckpt.read_tensors(p)
        bad = ckpt.non_finite(state)
        if bad is not None:
            raise ckpt.CheckpointError(f"{p}: tensor {bad} holds non-finite values")
        targets = json.loads(meta["targets"]) if meta.get("targets") else None
        lora = resolved(LoraConfig(**json.loads(meta["lora"])), state, targets)
        return AdapterFile(state, lora, meta.get("base") or None, meta.get("base_sha256") or None)
    cfg = ckpt.read_config(p)
    if cfg.lora.mode == "none":
        raise ckpt.CheckpointError(f"{p}: not a LoRA checkpoint (lora.mode is none)")
    state = ckpt.load_weights(p, "ema" if ema else "model")
    return AdapterFile(state, resolved(cfg.lora, state), cfg.train.init_from,
                       ckpt.read_metadata(p).get("base_sha256") or None)


def resolved(cfg: LoraConfig, state: dict[str, torch.Tensor], targets: list[str] | None = None) -> LoraConfig:
    """`cfg` with layers chosen by SNR (select_fraction) replaced by the explicit names chosen: `targets`
    as recorded, else read off the adapter tensors' names (a training checkpoint's)."""
    if cfg.select_fraction is None:
        return cfg
    if targets is None:
        targets = sorted({k.split(".lora_A.")[0] for k in state
                          if is_adapter_key(k) and ".lora_A." in k and ".temporal." not in k})
    return dataclasses.replace(cfg, targets=list(targets), select_fraction=None)


def check_adapter_base(adapter: str | Path, info: AdapterFile, base: str | Path, force: bool = False) -> None:
    """Refuse an adapter on another base than the one it was trained on: same shapes, other weights
    load without complaint and give wrong outputs. `force` applies it anyway, with a warning."""
    actual = ckpt.weights_sha256(base)
    if info.base_sha256 is None or actual is None:  # written before identities were recorded
        log.warning("%s: cannot check that this adapter was trained on %s (no identity recorded)",
                    adapter, base)
        return
    if info.base_sha256 != actual:
        msg = (f"{adapter}: adapter trained on another base: it records base {info.base or '?'} "
               f"(sha256 {info.base_sha256[:16]}...), not {base} (sha256 {actual[:16]}...); "
               "give the base it was trained on, or force it (force=True, infer.py --force-adapter, "
               "merge_lora.py --force)")
        if not force:
            raise ckpt.CheckpointError(msg)
        log.warning("%s: applied anyway (forced)", msg)


def apply_adapter_file(model: JaT, path: str | Path, ema: bool = True,
                       compute_dtype: torch.dtype | None = None, base: str | Path | None = None,
                       force: bool = False) -> LoraConfig:
    """Adapt a base model as the adapter file says and load the adapter; returns its LoraConfig.
    With `base` (the checkpoint `model` was loaded from) the adapter must have been trained on it,
    unless `force`."""
    info = load_adapter_file(path, ema)
    if base is not None:
        check_adapter_base(path, info, base, force)
    apply_lora(model, info.lora, compute_dtype)
    load_adapter(model, info.state)
    return info.lora
