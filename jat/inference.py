"""Upsampling: LR audio -> latents -> flow sampling with the EMA weights -> HR audio (SPEC.md section 7)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from jat import checkpoint as ckpt
from jat.codecs import Codec, LatentNorm, build_codec
from jat.config import Config
from jat.flow import FlowMatching
from jat.model import JaT

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(device)


class Upsampler:
    """A trained model with its latent normalisation, codec and sampler."""

    def __init__(self, model: JaT, norm: LatentNorm, codec: Codec, flow: FlowMatching,
                 device: torch.device | str = "cpu", cfg: Config | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.norm = norm.to(self.device)
        self.codec = codec.to(self.device).eval()
        self.flow = flow
        self.cfg = cfg

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", ema: bool = True,
                        codec: Codec | None = None) -> Upsampler:
        """Load a checkpoint directory (or its weights.safetensors); EMA weights by default."""
        cfg = ckpt.read_config(path)
        model = JaT(cfg.model)
        try:
            model.load_state_dict(ckpt.load_weights(path, "ema" if ema else "model"))
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{path}: weights do not fit the stored config: {exc}") from None
        norm = LatentNorm.identity(cfg.model.in_channels)
        norm.load_state_dict(ckpt.load_weights(path, "norm"))
        return cls(model, norm, codec or build_codec(cfg.codec), FlowMatching(cfg.flow), pick_device(device), cfg)

    @torch.no_grad()
    def sample_latents(self, c: torch.Tensor, steps: int | None = None, solver: str | None = None,
                       cfg_scale: float | None = None, seed: int = 0) -> torch.Tensor:
        """Normalised LR latents c [B, C, T] -> normalised HR latents [B, C, T]."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn(c.shape, generator=g, device=self.device)
        return self.flow.sample(self.model, c, steps=steps, solver=solver, cfg_scale=cfg_scale, noise=noise)

    @torch.no_grad()
    def upsample_44k(self, lr: torch.Tensor, steps: int | None = None, solver: str | None = None,
                     cfg_scale: float | None = None, seed: int = 0) -> torch.Tensor:
        """LR audio already at 44.1 kHz [B, 1, L] -> upsampled audio [B, 1, L]."""
        L = lr.shape[-1]
        c = self.norm.normalize(self.codec.encode(lr.to(self.device).float()))  # [B, C, T]
        x = self.sample_latents(c, steps, solver, cfg_scale, seed)  # [B, C, T]
        return self.codec.decode(self.norm.denormalize(x), length=L).cpu()  # [B, 1, L]
