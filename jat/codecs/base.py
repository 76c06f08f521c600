"""The codec interface: audio [B, 1, L] <-> latents [B, C, T], chunked so memory stays flat.

The contract every codec and the model keep: audio at SAMPLE_RATE, HOP samples per latent frame. The
project's sample rate is written here once; everything else refers to it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

SAMPLE_RATE = 44100  # Hz: every codec, the model and every output run at this rate
HOP = 512  # audio samples per latent frame of every codec


class CodecError(RuntimeError):
    """A codec cannot be built or used (missing weights, wrong input shape, ...)."""


def latent_frames(seconds: float, sample_rate: int = SAMPLE_RATE, hop: int = HOP) -> int:
    """Latent frames T = ceil(L / hop) for `seconds` of audio (517 for 6 s at 44.1 kHz, hop 512)."""
    return math.ceil(round(seconds * sample_rate) / hop)


class Codec(nn.Module, ABC):
    """A frozen audio codec.

    Attributes every backend sets:
      sample_rate: audio rate in Hz (SAMPLE_RATE)
      hop: audio samples per latent frame (HOP)
      latent_dim: latent channels C
      channels: audio channels one call encodes (1: multichannel audio is folded into the batch)
      chunk_seconds: long audio is processed in chunks of about this length
      context_frames: latent frames of context either side that make separately coded blocks join
        exactly, for encode and decode (its receptive field; streaming inference reads it)
    """

    sample_rate: int
    hop: int
    latent_dim: int
    channels: int = 1
    chunk_seconds: float = 30.0
    context_frames: int

    def num_frames(self, length: int) -> int:
        """Latent frames T = ceil(length / hop) for `length` audio samples."""
        return -(-length // self.hop)

    @abstractmethod
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 1, L] float audio at `sample_rate` -> [B, C, num_frames(L)] latents (chunked inside)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """[B, C, T] latents -> [B, 1, L] audio, cropped to `length` samples when given."""

    @property
    def frame_rate(self) -> float:
        """Latent frames per second (SAMPLE_RATE / HOP = 86.13 for both backends)."""
        return self.sample_rate / self.hop

    @property
    def chunk_frames(self) -> int:
        """Latent frames per chunk of long-audio processing (at least 1)."""
        return max(1, round(self.chunk_seconds * self.sample_rate / self.hop))

    # -- shared input checks ------------------------------------------------------------------

    def _check_audio(self, audio: torch.Tensor) -> None:
        if audio.dim() != 3 or audio.shape[1] != self.channels:
            raise CodecError(
                f"{type(self).__name__}.encode expects audio [B, {self.channels}, L], "
                f"got {tuple(audio.shape)}; "
                "fold extra channels into the batch: audio.reshape(B * channels, 1, L)"
            )
        if not audio.is_floating_point():
            raise CodecError(f"audio must be floating point in [-1, 1], got dtype {audio.dtype}")

    def _check_latents(self, latents: torch.Tensor, length: int | None) -> None:
        if latents.dim() != 3 or latents.shape[1] != self.latent_dim:
            raise CodecError(
                f"{type(self).__name__}.decode expects latents [B, {self.latent_dim}, T], "
                f"got {tuple(latents.shape)}"
            )
        if length is not None and not 0 <= length <= latents.shape[-1] * self.hop:
            raise CodecError(
                f"cannot decode {length} samples from {latents.shape[-1]} frames "
                f"(at most {latents.shape[-1] * self.hop})"
            )


def chunk_ranges(num_frames: int, chunk: int) -> list[tuple[int, int]]:
    """Split frames [0, num_frames) into consecutive [start, end) ranges of at most `chunk` frames."""
    return [(s, min(s + chunk, num_frames)) for s in range(0, num_frames, chunk)]
