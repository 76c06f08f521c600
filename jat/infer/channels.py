"""What the upsampler learns about a signal's channels before any model work (docs/design.md section 7):
each channel's level gain and which channels are bit-identical copies of an earlier one.

Both are measured in one pass over the signal at its own rate, a block at a time (`ChannelMeter`), so a
file streamed from disk and the same signal held as a tensor get the same gains and the same copies:

  gain:   `jat.data.audio.level_gain`'s definition (RMS to REF_RMS_DBFS, capped so the peak stays at
          PEAK_MAX, 0 for digital silence) over the whole signal: `gain_from_stats` of per-block sums
          of squares (float64) and peaks;
  source: source[k] is the first channel j <= k whose samples equal channel k's everywhere. Only
          channels with source[k] == k go through the model; a copy takes its source's output, so
          dual-mono in gives dual-mono out, bit for bit, whatever the hardware's batched arithmetic.
"""

from __future__ import annotations

import torch

from jat.data.audio import gain_from_stats

SQUARES_CHUNK = 2**20  # samples per float64 partial sum (no float64 copy of a long block)


class ChannelMeter:
    """Accumulates blocks [C, n] of one signal: sums of squares, peaks, non-finite samples, copies."""

    def __init__(self, channels: int):
        self.channels = channels
        self.length = 0
        self.squares = torch.zeros(channels, dtype=torch.float64)  # [C]
        self.peak = torch.zeros(channels, dtype=torch.float64)  # [C]
        self.nonfinite = 0
        self._same = torch.ones(channels, channels, dtype=torch.bool)  # [C, C] equal so far

    def update(self, block: torch.Tensor) -> None:
        """Add the next block [C, n] of the signal."""
        if block.dim() != 2 or block.shape[0] != self.channels:
            raise ValueError(f"expected a block [{self.channels}, n], got {tuple(block.shape)}")
        finite = torch.isfinite(block)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            block = torch.where(finite, block, 0.0)
        n = block.shape[-1]
        for a in range(0, n, SQUARES_CHUNK):
            self.squares += block[:, a : a + SQUARES_CHUNK].double().square().sum(-1)
        if n:
            self.peak = torch.maximum(self.peak, block.abs().amax(-1).double())
        for j in range(self.channels):
            for k in range(j + 1, self.channels):
                if self._same[j, k] and not torch.equal(block[j], block[k]):
                    self._same[j, k] = self._same[k, j] = False
        self.length += n

    @property
    def gain(self) -> torch.Tensor:
        """Gain [C] per channel: `level_gain` of the whole signal seen so far."""
        return gain_from_stats(self.squares, self.length, self.peak)

    @property
    def source(self) -> list[int]:
        """source[k]: the first channel equal to channel k throughout (k itself when none is)."""
        return [int(self._same[k, : k + 1].nonzero()[0]) for k in range(self.channels)]


def measure(audio: torch.Tensor) -> ChannelMeter:
    """A ChannelMeter over a whole signal [C, L] (one block)."""
    meter = ChannelMeter(audio.shape[0])
    meter.update(audio)
    return meter
