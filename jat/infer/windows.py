"""The latent windows of the upsampler (docs/design.md section 7): their layout, their blend weights and
the initial noise of every frame, which depends only on (seed, stream, frame) so that any window sees the
same noise at a frame, and every channel of a signal uses the same stream (SHARED_NOISE)."""

from __future__ import annotations

import math

import numpy as np
import torch

NOISE_BLOCK = 64  # frames per independently seeded noise block
SHARED_NOISE = 0  # the noise stream every channel of a signal starts from

__all__ = ["NOISE_BLOCK", "SHARED_NOISE", "frame_noise", "window_ranges", "window_weights"]


def _block_seed(seed: int, stream: int, block: int) -> int:
    state = np.random.SeedSequence([seed, stream, block]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def frame_noise(seed: int, stream: int, start: int, end: int, channels: int) -> torch.Tensor:
    """Initial noise [channels, end - start] of frames [start, end) of noise stream `stream` (CPU).

    Frame t's noise depends only on (seed, stream, t), so any window sees the same noise there.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    b0, b1 = start // NOISE_BLOCK, -(-end // NOISE_BLOCK)
    gens = [torch.Generator().manual_seed(_block_seed(seed, stream, b)) for b in range(b0, b1)]
    blocks = torch.cat([torch.randn(channels, NOISE_BLOCK, generator=g) for g in gens], 1)  # [channels, N]
    return blocks[:, start - b0 * NOISE_BLOCK : end - b0 * NOISE_BLOCK]  # [channels, end - start]


def window_ranges(total: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges covering [0, total): all `window` long (one range if total <= window),
    evenly spread so neighbours overlap by at least `overlap` frames."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got {window}, {overlap}")
    if total <= window:
        return [(0, total)]
    n = math.ceil((total - overlap) / (window - overlap))
    starts = [round(i * (total - window) / (n - 1)) for i in range(n)]
    return [(s, s + window) for s in starts]


def window_weights(ranges: list[tuple[int, int]], i: int) -> torch.Tensor:
    """Blend weights [end - start] of window i: raised-cosine ramps over its overlaps with its
    neighbours (strictly positive), 1 elsewhere. Divide the weighted sum by the summed weights."""
    s, e = ranges[i]
    w = torch.ones(e - s, dtype=torch.float64)

    def ramp(n: int) -> torch.Tensor:
        return 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n)  # [n] 0 -> 1

    if i > 0 and ranges[i - 1][1] > s:
        n = ranges[i - 1][1] - s
        w[:n] *= ramp(n)
    if i + 1 < len(ranges) and ranges[i + 1][0] < e:
        n = e - ranges[i + 1][0]
        w[e - s - n :] *= ramp(n).flip(0)
    return w.float()
