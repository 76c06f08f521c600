"""Codecs: audio [B, 1, L] <-> latents [B, C, T] (docs/design.md section 2), and latent normalisation.

Backends: `MDCTCodec` (weight-free, C = 512) and `DACCodec` (descript-audio-codec, C = 1024 for
the 44 kHz model). Both run at 44.1 kHz with hop 512 and T = ceil(L / 512) frames, frame t
centred on samples [t*512, (t+1)*512). The `dac` package is imported only when a DAC codec is built.
"""

from __future__ import annotations

from ..config import CodecConfig
from .base import Codec, CodecError, chunk_ranges, latent_frames
from .dac import DACCodec, load_dac_model
from .mdct import MDCTCodec
from .norm import LatentNorm, LatentStats

__all__ = [
    "Codec",
    "CodecError",
    "DACCodec",
    "LatentNorm",
    "LatentStats",
    "MDCTCodec",
    "build_codec",
    "chunk_ranges",
    "latent_frames",
    "load_dac_model",
]


def build_codec(cfg: CodecConfig) -> Codec:
    """The frozen codec a `CodecConfig` names (`mdct` or `dac`), in eval mode."""
    if cfg.name == "mdct":
        return MDCTCodec(compression=cfg.mdct_compression, chunk_seconds=cfg.chunk_seconds).eval()
    if cfg.name == "dac":
        return DACCodec(cfg).eval()
    raise CodecError(f"unknown codec '{cfg.name}' (choose 'mdct' or 'dac')")
