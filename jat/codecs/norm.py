"""Per-channel latent normalisation (docs/design.md section 1), its statistics gathered in one pass.

`LatentStats` accumulates per-channel count, mean and sum of squared deviations in float64 and
merges batches with Chan et al.'s parallel update, which stays accurate when the mean is large
compared with the spread (plain sums of squares would cancel). `finalize()` gives a `LatentNorm`,
a small module stored with the model whose buffers travel in its state_dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class LatentNorm(nn.Module):
    """z_norm = (z - mean) / std per channel, for latents [B, C, T].

    Args:
        mean: per-channel mean [C].
        std: per-channel standard deviation [C] (must be positive; `LatentStats` floors it).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        if mean.shape != std.shape or mean.dim() != 1:
            raise ValueError(f"mean and std must both be [C], got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive in every channel")
        self.register_buffer("mean", mean.detach().float().clone())  # [C]
        self.register_buffer("std", std.detach().float().clone())  # [C]

    @classmethod
    def identity(cls, channels: int) -> LatentNorm:
        """mean 0, std 1: normalisation off (before statistics exist)."""
        return cls(torch.zeros(channels), torch.ones(channels))

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def normalize(self, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """[B, C, T] codec latents -> [B, C, T] zero-mean unit-variance latents (into z if inplace)."""
        mean, std = self.mean[:, None].to(z.dtype), self.std[:, None].to(z.dtype)
        return z.sub_(mean).div_(std) if inplace else (z - mean) / std

    def denormalize(self, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """[B, C, T] normalised latents -> [B, C, T] codec latents (the inverse of `normalize`)."""
        mean, std = self.mean[:, None].to(z.dtype), self.std[:, None].to(z.dtype)
        return z.mul_(std).add_(mean) if inplace else z * std + mean

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.normalize(z)

    def save(self, path: str | Path) -> None:
        """Write mean and std to a safetensors file."""
        save_file({"mean": self.mean.cpu().contiguous(), "std": self.std.cpu().contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> LatentNorm:
        """Read a file written by `save`."""
        tensors = load_file(str(path))
        missing = {"mean", "std"} - tensors.keys()
        if missing:
            raise ValueError(f"{path}: not a latent-norm file (missing {sorted(missing)})")
        return cls(tensors["mean"], tensors["std"])


class LatentStats:
    """Streaming per-channel mean and standard deviation of latents [B, C, T].

    Args:
        channels: latent channels C.
        rel_floor: std is floored at rel_floor * (largest channel std), and at `abs_floor`, so a
            silent or constant channel cannot cause a division by zero.
        abs_floor: absolute lower bound of the std.
    """

    def __init__(self, channels: int, rel_floor: float = 1e-5, abs_floor: float = 1e-8) -> None:
        self.channels = channels
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)  # [C]
        self.m2 = torch.zeros(channels, dtype=torch.float64)  # [C] sum of squared deviations

    @torch.no_grad()
    def update(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add latents z [B, C, T]; mask [B, T] (True = real frame) excludes padded frames."""
        if z.dim() != 3 or z.shape[1] != self.channels:
            raise ValueError(f"expected latents [B, {self.channels}, T], got {tuple(z.shape)}")
        x = z.detach().to("cpu", torch.float64).transpose(1, 2).reshape(-1, self.channels)  # [B*T, C]
        if mask is not None:
            if mask.shape != (z.shape[0], z.shape[2]):
                raise ValueError(f"mask must be [B, T] = {(z.shape[0], z.shape[2])}, got {tuple(mask.shape)}")
            x = x[mask.detach().to("cpu", torch.bool).reshape(-1)]  # [N, C]
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)  # [C]
        self.merge(n, mean_b, (x - mean_b).pow(2).sum(0))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Pool in the moments of n more frames: their mean [C] and summed squared deviations [C]
        (Chan et al.'s parallel update)."""
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean  # [C]
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    def finalize(self, unbiased: bool = True) -> LatentNorm:
        """The accumulated statistics as a `LatentNorm` (std unbiased by default, like torch.std)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 frames to estimate a std, got {self.count}")
        var = self.m2 / (self.count - 1 if unbiased else self.count)  # [C]
        std = var.sqrt()
        floor = max(self.rel_floor * float(std.max()), self.abs_floor)
        return LatentNorm(self.mean.float(), std.clamp_min(floor).float())
