"""Overlap-save (docs/design.md section 7): a local operation applied to a stream a block at a time, each
block read with enough context either side that the blocks join exactly.

A stage's input and output live on one grid of units: `unit_in` input samples give `unit_out` output
samples (a resampler's polyphase period, a codec's hop, an STFT's hop), and an output unit depends on
input no further than `context` units away. Block [a, b) (in units) is computed from input units
[a - context, b + context), clipped to the signal, so it sees exactly what a one-shot run over the whole
signal sees there (the signal's own two ends included); only float rounding of the operation itself can
differ. The stage holds at most `block + 2 * context` units of input plus the last piece pushed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Local:
    """Apply `op` (a segment [..., n] starting on the unit grid -> its output [..., m]) to a stream.

    Args:
        op: the operation; its output for a segment starting at unit u starts at output unit u.
        total_in: input samples in the whole signal; total_out: output samples (the output is cropped).
        unit_in, unit_out: input and output samples per grid unit.
        context: units of context either side (at least the operation's reach).
        block: units per computed block.
    """

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], total_in: int, total_out: int,
                 unit_in: int, unit_out: int, context: int, block: int):
        if min(unit_in, unit_out, block) < 1 or context < 0:
            raise ValueError(f"bad overlap-save grid: units {unit_in} -> {unit_out}, context {context}, "
                             f"block {block}")
        self.op, self.total_in, self.total_out = op, total_in, total_out
        self.unit_in, self.unit_out, self.context, self.block = unit_in, unit_out, context, block
        self.units = -(-total_in // unit_in)
        self.buf: torch.Tensor | None = None  # [..., n] input from sample `start` on
        self.start = 0  # input sample of buf[..., 0]
        self.have = 0  # input samples pushed so far
        self.done = 0  # output units emitted so far
        self.held = 0  # the most input samples held at once (for memory checks)

    @property
    def finished(self) -> bool:
        return self.done == self.units

    def push(self, x: torch.Tensor) -> torch.Tensor | None:
        """Append input x [..., n]; return every output block that is now complete (None if none is)."""
        if self.have + x.shape[-1] > self.total_in:
            raise ValueError(f"pushed {self.have + x.shape[-1]} samples into a {self.total_in}-sample stage")
        self.buf = x if self.buf is None else torch.cat([self.buf, x], -1)
        self.have += x.shape[-1]
        self.held = max(self.held, self.buf.shape[-1])
        outs = []
        while self.done < self.units:
            a, b = self.done, min(self.done + self.block, self.units)
            need = min((b + self.context) * self.unit_in, self.total_in)
            if self.have < need:
                break
            lo = max(a - self.context, 0)
            y = self.op(self.buf[..., lo * self.unit_in - self.start : need - self.start])
            first, last = a * self.unit_out, min(b * self.unit_out, self.total_out)
            offset = (a - lo) * self.unit_out
            outs.append(y[..., offset : offset + last - first])
            self.done = b
            keep = max(b - self.context, 0) * self.unit_in  # the next block's context starts here
            self.buf, self.start = self.buf[..., keep - self.start :], keep
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The whole signal x [..., total_in] at once, still a block at a time."""
        y = self.push(x)
        if not self.finished:
            raise ValueError(f"run() needs the whole {self.total_in}-sample signal, got {x.shape[-1]}")
        return y


class Fifo:
    """Samples [..., n] queued in order and taken back in any sized pieces (a stream's delay line)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.size = 0
        self.held = 0

    def put(self, x: torch.Tensor) -> None:
        if x.shape[-1]:
            self.parts.append(x)
            self.size += x.shape[-1]
            self.held = max(self.held, self.size)

    def take(self, n: int) -> torch.Tensor:
        if n > self.size:
            raise ValueError(f"asked for {n} samples, {self.size} queued")
        out, got = [], 0
        while got < n:
            part = self.parts[0]
            use = min(n - got, part.shape[-1])
            out.append(part[..., :use])
            self.parts[0] = part[..., use:]
            if not self.parts[0].shape[-1]:
                self.parts.pop(0)
            got += use
        self.size -= n
        return torch.cat(out, -1) if out else torch.empty(0)
