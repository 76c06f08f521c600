"""From a checkpoint to what samples (docs/design.md section 5): the network, its config, and the latent
space it was trained in. The one place where a checkpoint becomes a model: inference, evaluation,
merging and fine-tuning's base all load through here.

    load_model(checkpoint, adapter) -> (model, config, base checkpoint)
    latent_space(checkpoint, config) -> LatentSpace (the codec the config names + the stored statistics)

A checkpoint is a plain one, a merged LoRA export, a base plus an adapter file, or a LoRA training
checkpoint alone (its base is its config's train.init_from).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from jat.atomic import write_atomic
from jat.checkpoint import store as ckpt
from jat.checkpoint.adapters import apply_adapter_file
from jat.codecs import Codec, CodecError, LatentNorm
from jat.codecs.latent import LatentSpace
from jat.config import Config, LoraConfig
from jat.model.dit import JaT
from jat.model.lora import add_temporal_adapters, merge_lora


def build_model(cfg: Config) -> JaT:
    """The plain network a checkpoint with this config holds: JaT, plus full-precision temporal
    adapters for a merged export of a temporal-adapter fine-tune (lora.mode none)."""
    model = JaT(cfg.model)
    if cfg.lora.mode == "none" and cfg.lora.temporal_adapter:
        add_temporal_adapters(model, cfg.lora, lora=False, quantize=False, compute_dtype=torch.float32)
    return model


def latent_norm(checkpoint: str | Path, channels: int) -> LatentNorm:
    """The latent normalisation stored in `checkpoint`, for a model of `channels` latent channels."""
    norm = LatentNorm.identity(channels)
    ckpt.load_checked(norm, ckpt.load_weights(checkpoint, "norm"), f"{checkpoint}: latent statistics")
    return norm


def latent_space(checkpoint: str | Path, cfg: Config, codec: Codec | None = None) -> LatentSpace:
    """The latent space `checkpoint` was trained in: its stored normalisation and the codec its config
    names (or `codec`, e.g. one already on a device). CheckpointError when the statistics do not fit
    the config or the codec gives another channel count than the model takes."""
    norm = latent_norm(checkpoint, cfg.model.in_channels)
    try:
        space = LatentSpace(codec if codec is not None else cfg.codec, norm, name=cfg.codec.name)
        space.codec  # noqa: B018  built now, so that a mismatch is reported against this checkpoint
    except CodecError as exc:
        raise ckpt.CheckpointError(f"{checkpoint}: {exc}") from None
    return space


def load_model(checkpoint: str | Path, adapter: str | Path | None = None, ema: bool = True,
                         device: torch.device | str = "cpu", force: bool = False) -> tuple[JaT, Config, Path]:
    """A model ready to sample on `device` (4-bit weights quantized there; bf16 compute on CUDA):
    a plain or merged checkpoint; or a base checkpoint plus an adapter; or a LoRA training
    checkpoint alone (its base is its config's train.init_from). Weights are verified against their
    checksums and refused if non-finite; an adapter is refused on another base than its own unless
    `force`.

    Returns (model in eval mode, config, the checkpoint whose latent normalisation to use: the base).
    """
    cfg = ckpt.read_config(checkpoint)
    base = Path(checkpoint)
    if adapter is None and cfg.lora.mode != "none":
        if not cfg.train.init_from:
            raise ckpt.CheckpointError(f"{checkpoint}: LoRA checkpoint without train.init_from: "
                                       "give the base checkpoint and this one as the adapter")
        adapter, base, flow = checkpoint, Path(cfg.train.init_from), cfg.flow
        cfg = ckpt.read_config(base)
        cfg.flow = flow  # the sampler the adapters were trained for (a distilled student's few steps)
    model = build_model(cfg)
    ckpt.load_checked(model, ckpt.load_weights(base, "ema" if ema else "model"), f"{base}: model weights")
    model.to(device)
    if adapter is not None:
        cfg = copy.deepcopy(cfg)
        cfg.lora = apply_adapter_file(model, adapter, ema, base=base, force=force)
    return model.eval(), cfg, base



def fold_adapters(model: JaT, cfg: Config) -> None:
    """Fold an adapted model's adapters into plain weights (`merge_lora`), in place, and make `cfg`
    describe the result: lora.mode none (temporal adapters kept, now plain), no base checkpoint."""
    merge_lora(model)
    cfg.lora = LoraConfig(mode="none", temporal_adapter=cfg.lora.temporal_adapter,
                          temporal_dim=cfg.lora.temporal_dim, temporal_kernel=cfg.lora.temporal_kernel)
    cfg.train.init_from = None


def merge_checkpoint(checkpoint: str | Path, out: str | Path, adapter: str | Path | None = None,
                     force: bool = False) -> Path:
    """Base checkpoint + adapter (or a LoRA training checkpoint alone) -> a full-precision checkpoint
    `out/weights.safetensors` that loads like any trained one (model, ema, norm; lora.mode none).
    `force` merges an adapter onto another base than the one it was trained on."""
    model, cfg, base_path = load_model(checkpoint, adapter, force=force)
    if cfg.lora.mode == "none":
        raise ValueError(f"{checkpoint}: no adapter to merge (give --adapter, or a LoRA training checkpoint)")
    fold_adapters(model, cfg)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    model_state = {k: v.clone() for k, v in state.items()}  # safetensors refuses shared memory
    norm = ckpt.load_weights(base_path, "norm")
    merged_from = {"merged_from": json.dumps({"base": str(base_path), "adapter": str(adapter or checkpoint)})}
    out = Path(out)
    write_atomic(out / "weights.safetensors",
                 lambda tmp: ckpt.write_weights(tmp, cfg=cfg, step=0, ema=state, model=model_state, norm=norm,
                                                extra_meta=merged_from))
    return out
