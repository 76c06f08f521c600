"""The codec interface: audio [B, 1, L] <-> latents [B, C, T], chunked so memory stays flat."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Codec(nn.Module, ABC):
    """A frozen audio codec.

    Attributes every backend sets:
      sample_rate: audio rate in Hz (44100)
      hop: audio samples per latent frame (512)
      latent_dim: latent channels C
      channels: audio channels one call encodes (1: multichannel audio is folded into the batch)
    """

    sample_rate: int
    hop: int
    latent_dim: int
    channels: int = 1

    @abstractmethod
    def num_frames(self, length: int) -> int:
        """Latent frames T for `length` audio samples."""

    @abstractmethod
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 1, L] float audio at `sample_rate` -> [B, C, num_frames(L)] latents (chunked inside)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """[B, C, T] latents -> [B, 1, L] audio, cropped to `length` samples when given."""
