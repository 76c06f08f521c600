"""The latent space the model lives in (docs/design.md section 2): a frozen codec and the per-channel
normalisation of its latents, with the frame grid that ties the two to audio.

    encode: audio [B, 1, L] at `sample_rate` -> normalised latents [B, C, T],  T = ceil(L / hop)
    decode: normalised latents [B, C, T]      -> audio [B, 1, L]

Training data, the trainer, validation, inference and evaluation all take one `LatentSpace` rather
than a codec and a normalisation each. A checkpoint stores its normalisation (`norm.*` tensors) and
the codec's config; `jat.checkpoint.load.latent_space` restores both in one place.
"""

from __future__ import annotations

import torch
from torch import nn

from jat.codecs import Codec, LatentNorm, LatentStats, build_codec
from jat.codecs.base import CodecError
from jat.config import CodecConfig


class LatentSpace(nn.Module):
    """A codec (built from its config when first used) and the normalisation of its latents; `name`
    names a given codec in messages. CodecError when the two disagree on the channel count."""

    def __init__(self, codec: Codec | CodecConfig, norm: LatentNorm, name: str | None = None):
        super().__init__()
        self._codec_cfg = codec if isinstance(codec, CodecConfig) else None
        self._codec = None
        self.norm = norm
        if not isinstance(codec, CodecConfig):
            self._set_codec(codec, name or type(codec).__name__)

    def _set_codec(self, codec: Codec, name: str) -> None:
        if codec.latent_dim != self.channels:
            raise CodecError(f"codec '{name}' gives {codec.latent_dim} latent channels, the model expects "
                             f"{self.channels}")
        self._codec = codec

    @classmethod
    def identity(cls, codec: Codec | CodecConfig, channels: int) -> LatentSpace:
        """Latents as the codec gives them (mean 0, std 1 normalisation)."""
        return cls(codec, LatentNorm.identity(channels))

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            self._set_codec(build_codec(self._codec_cfg).to(self.norm.mean.device), self._codec_cfg.name)
        return self._codec

    # --- the frame grid ---------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.norm.channels

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def hop(self) -> int:
        return self.codec.hop

    @property
    def frame_rate(self) -> float:
        return self.codec.frame_rate

    def frame_mask(self, sample_mask: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, L] sample mask -> [B, T] frame mask: a frame is valid if any of its samples is."""
        B, L = sample_mask.shape
        padded = nn.functional.pad(sample_mask, (0, frames * self.hop - L))  # [B, T * hop]
        return padded.view(B, frames, self.hop).any(-1)  # [B, T]

    # --- audio <-> normalised latents --------------------------------------------------------------
    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [B, 1, L] -> normalised latents [B, C, T] (normalised in place: no second copy)."""
        return self.norm.normalize(self.codec.encode(audio), inplace=True)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, length: int | None = None, inplace: bool = False) -> torch.Tensor:
        """Normalised latents [B, C, T] -> audio [B, 1, L] (`length` samples when given)."""
        return self.codec.decode(self.norm.denormalize(z, inplace=inplace), length=length)

    @torch.no_grad()
    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantizer codes [B, Q, T] (a codes cache, jat/data/precompute.py) -> the codec's latents
        [B, C, T], not normalised; CodecError for a codec without codes."""
        if not hasattr(self.codec, "from_codes"):
            raise CodecError(f"the {type(self.codec).__name__} codec has no quantizer codes: these latent "
                             "shards were made with another codec (codec.name)")
        return self.codec.from_codes(codes)

    def normalize(self, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self.norm.normalize(z, inplace)

    def denormalize(self, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self.norm.denormalize(z, inplace)

    @torch.no_grad()
    def estimate_norm(self, items, device: torch.device | str = "cpu") -> LatentSpace:
        """A LatentSpace over this codec whose normalisation is estimated from (audio [1, 1, L],
        sample mask [1, L]) items: the statistics of their latents over valid frames."""
        stats = LatentStats(self.codec.latent_dim)
        for audio, mask in items:
            z = self.codec.encode(audio.to(device))  # [1, C, T]
            stats.update(z.cpu(), self.frame_mask(mask, z.shape[-1]))
        return LatentSpace(self.codec, stats.finalize())
