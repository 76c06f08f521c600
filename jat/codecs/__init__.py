"""Codecs: audio [B, 1, L] <-> latents [B, C, T] (docs/design.md section 2), and latent normalisation.

Backends: `MDCTCodec` (weight-free) and `DACCodec` (descript-audio-codec); `LATENT_DIMS` gives the
latent channels C of each. Both run at SAMPLE_RATE (44.1 kHz) with HOP (512) samples per frame and
T = ceil(L / HOP) frames, frame t centred on samples [t*HOP, (t+1)*HOP) (`base`). The `dac` package is
imported only when a DAC codec is built.
"""

from __future__ import annotations

from ..config import CodecConfig
from .base import HOP, SAMPLE_RATE, Codec, CodecError, chunk_ranges, latent_frames
from .dac import DACCodec, load_dac_model
from .mdct import MDCTCodec
from .norm import LatentNorm, LatentStats

__all__ = [
    "HOP",
    "LATENT_DIMS",
    "SAMPLE_RATE",
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


# Latent channels C of each backend (what model.in_channels must be): the MDCT has one per bin of its
# hop-long frame; DAC's 44 kHz model (`dac.DAC`'s default architecture: 64 * 2**4) has 1024.
LATENT_DIMS: dict[str, int] = {"dac": 1024, "mdct": HOP}


def build_codec(cfg: CodecConfig) -> Codec:
    """The frozen codec a `CodecConfig` names (`mdct` or `dac`), in eval mode."""
    if cfg.name == "mdct":
        return MDCTCodec(compression=cfg.mdct_compression, chunk_seconds=cfg.chunk_seconds).eval()
    if cfg.name == "dac":
        return DACCodec(cfg).eval()
    raise CodecError(f"unknown codec '{cfg.name}' (choose 'mdct' or 'dac')")
