"""Streaming upsampling (docs/design.md section 7): the whole-file path of `jat.infer.upsampler`, a block at a
time, so memory does not depend on the file's length.

A file is read twice. The first pass (`inspect_file`) reads it in blocks and measures its channels
(`channels.ChannelMeter`: level gains, copies, non-finite samples); the cutoff comes from at most
CUTOFF_SECONDS of excerpts (`band.estimate_cutoff`, the same definition as for a tensor). The second pass
pushes blocks through a chain of stages (`UpsampleStream`), each an overlap-save `blocks.Local` whose
context covers the operation's reach, so blocks join exactly:

  input [U, n] at sr --resample--> lr at 44.1 kHz        context: twice the sinc kernel's reach
  lr --level gain, encode--> c [A, Cz, f]                 context: the codec's (`codec_context`)
  c --windows, sampled and blended--> z [A, Cz, f]        the same windows as the whole-file path
  z --decode, gain undone--> [U, n'] at 44.1 kHz          context: the codec's
  --resample--> [U, m] at the output rate R               context: as above
  --low-frequency replacement against the input at R-->   context: the STFT's n_fft, on its hop grid

The window layout depends only on the file's frame count, known from its header, and a window is sampled
once its condition frames are all encoded; frames before the first window not yet sampled are final
(every window over them is in the blend). U: the distinct channels, A: those not silent; copies are
expanded on output. What any stage holds at once is bounded by its block and context, never by the
length (`UpsampleStream.held`); the result equals `Upsampler.upsample` on the whole signal up to float
rounding (tests/test_streaming.py).
"""

from __future__ import annotations

import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import soundfile as sf
import torch

from jat.codecs import Codec
from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import AudioError, audio_info, read_samples, restore_level
from jat.infer.band import CUTOFF_SECONDS, estimate_cutoff, low_frequency_replace, output_length
from jat.infer.blocks import Fifo, Local
from jat.infer.channels import ChannelMeter
from jat.infer.rates import output_rate, rate_length, resampler
from jat.infer.upsampler import MIN_SECONDS, Progress, Upsampler, UpsampleResult
from jat.infer.windows import window_ranges, window_weights

BLOCK_SECONDS = 10.0  # audio per block of every stage (and per read)
_LFR = inspect.signature(low_frequency_replace).parameters  # its transform, so its reach is read once
LFR_FFT, LFR_HOP = _LFR["n_fft"].default, _LFR["hop"].default


def codec_context(codec: Codec) -> int:
    """Latent frames of context either side that make a codec's blocks join exactly, for encode and decode:
    the codec's own `context_frames` (DAC's is computed from its convolutions, MDCT's is 2)."""
    ctx = getattr(codec, "context_frames", None)
    if ctx is None:
        raise ValueError(f"{type(codec).__name__}: no receptive field known (give it a context_frames "
                         f"attribute) so it cannot be streamed")
    return int(ctx)


# --- the first pass ----------------------------------------------------------------------------------


def read_blocks(path: Path, block: int, start: int = 0) -> Iterator[torch.Tensor]:
    """A file's samples as float32 blocks [C, <= block] from `start` on; AudioError naming the file."""
    try:
        with sf.SoundFile(str(path)) as f:
            f.seek(start)
            for data in f.blocks(block, dtype="float32", always_2d=True):  # [n, C]
                yield torch.from_numpy(data.T.copy())  # [C, n]
    except (RuntimeError, ValueError, sf.LibsndfileError) as exc:
        raise AudioError(f"{path}: not a readable audio file (soundfile: {exc})") from None


class _FileExcerpts:
    """A file seen as a signal [C, L] that is only ever sliced ([..., a:b]): what `estimate_cutoff` reads
    from a long input (its excerpts), read from disk when asked for."""

    def __init__(self, path: Path, channels: int, length: int):
        self.path, self.shape = path, (channels, length)

    def __getitem__(self, index) -> torch.Tensor:
        part = index[-1] if isinstance(index, tuple) else index
        if not isinstance(part, slice) or part.step not in (None, 1) or (isinstance(index, tuple)
                                                                          and index[:-1] != (Ellipsis,)):
            raise TypeError(f"{self.path}: a streamed file can only be sliced in time, got {index!r}")
        a, b, _ = part.indices(self.shape[1])
        return read_samples(self.path, a, b)[0]


def file_cutoff(path: Path, sr: int, channels: int, length: int, cutoff: float | str | None) -> float:
    """The cutoff as `Upsampler.upsample` would find it for the whole file (Hz, at most sr / 2): given,
    or `estimate_cutoff`, which reads a long input only through excerpts of CUTOFF_SECONDS in all."""
    if cutoff not in (None, "auto"):
        return min(float(cutoff), sr / 2)
    if length <= (CUTOFF_SECONDS + 1) * sr:  # short: the whole of it is no more than the excerpts
        return estimate_cutoff(read_samples(path)[0], sr)
    return estimate_cutoff(_FileExcerpts(path, channels, length), sr)


def inspect_file(path: Path, block_seconds: float = BLOCK_SECONDS) -> tuple[int, int, ChannelMeter]:
    """(rate, frames, ChannelMeter over the whole file) in one pass of bounded memory. AudioError naming
    the file when it is missing, unreadable, empty, shorter than MIN_SECONDS or holds NaN/Inf."""
    sr, channels, frames = audio_info(path)
    if frames == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)")
    if frames < MIN_SECONDS * sr:
        raise AudioError(f"{path}: too short ({frames / sr * 1000:.1f} ms; at least {MIN_SECONDS * 1000:.0f} "
                         f"ms needed)")
    meter = ChannelMeter(channels)
    for block in read_blocks(path, max(1, round(block_seconds * sr))):
        meter.update(block)
    if meter.nonfinite:
        raise AudioError(f"{path}: {meter.nonfinite} NaN/Inf samples")
    if meter.length != frames:
        raise AudioError(f"{path}: the header says {frames} frames, {meter.length} could be read")
    return sr, frames, meter


# --- the second pass ---------------------------------------------------------------------------------


class WindowSampler:
    """Latent frames c [A, Cz, f] in, in order; blended sampled frames z out once final (see module doc)."""

    def __init__(self, up: Upsampler, total: int, rows: int, run: dict, progress: Callable[[int], None],
                 result: UpsampleResult):
        self.up, self.total, self.rows, self.run = up, total, rows, run
        self.progress, self.result = progress, result
        self.ranges = window_ranges(total, up.window, up.overlap)
        self.c: torch.Tensor | None = None  # [A, Cz, n] condition frames from `start` on
        self.acc: torch.Tensor | None = None  # [A, Cz, n] weighted sum of sampled windows, from `start`
        self.wsum: torch.Tensor | None = None  # [n]
        self.start = self.have = self.queued = self.done = 0
        self.queue: deque[tuple[int, int]] = deque()  # (window, row) ready to sample
        self.left = [rows] * len(self.ranges)  # rows of each window not sampled yet
        self.held = 0

    def push(self, c: torch.Tensor | None) -> torch.Tensor | None:
        if c is not None and c.shape[-1]:
            zeros = torch.zeros_like(c)
            self.c = c if self.c is None else torch.cat([self.c, c], -1)
            self.acc = zeros if self.acc is None else torch.cat([self.acc, zeros], -1)
            w = torch.zeros(c.shape[-1], device=c.device)
            self.wsum = w if self.wsum is None else torch.cat([self.wsum, w])
            self.have += c.shape[-1]
            self.held = max(self.held, self.c.shape[-1])
        while self.queued < len(self.ranges) and self.ranges[self.queued][1] <= self.have:
            self.queue.extend((self.queued, a) for a in range(self.rows))
            self.queued += 1
        bs = self.up.batch_size
        while len(self.queue) >= bs or (self.queue and self.have == self.total):
            self._sample([self.queue.popleft() for _ in range(min(bs, len(self.queue)))])
        while self.done < len(self.ranges) and not self.left[self.done]:
            self.done += 1
        final = self.ranges[self.done][0] if self.done < len(self.ranges) else self.total
        if final <= self.start:
            return None
        n = final - self.start
        z = self.acc[..., :n] / self.wsum[:n]  # [A, Cz, n]
        self.c, self.acc, self.wsum, self.start = self.c[..., n:], self.acc[..., n:], self.wsum[n:], final
        return z

    def _sample(self, batch: list[tuple[int, int]]) -> None:
        s0 = self.start
        rows = [(self.c[a, :, self.ranges[i][0] - s0 : self.ranges[i][1] - s0], self.ranges[i][0])
                for i, a in batch]
        x, elapsed = self.up.sample_windows(rows, **self.run)  # [B, Cz, W]
        self.result.network_s += elapsed
        for b, (i, a) in enumerate(batch):
            s, e = self.ranges[i]
            w = window_weights(self.ranges, i).to(x.device)  # [e - s]
            self.acc[a, :, s - s0 : e - s0] += x[b, :, : e - s] * w
            if a == 0:
                self.wsum[s - s0 : e - s0] += w
            self.left[i] -= 1
            self.progress(1)


class UpsampleStream:
    """One signal [C, L] at `sr`, pushed a block at a time (`push`), upsampled as `Upsampler.upsample`
    does with the same settings; `meter` has measured the whole signal first (`inspect_file`).

    `push` returns the output blocks that are complete, [C, m] at `rate`; once all L samples are in,
    all rate_length(L, sr, rate) samples are out. `preview` seconds of output and of the input at `rate`
    are kept in `result` (for a spectrogram).
    """

    def __init__(self, up: Upsampler, sr: int, length: int, meter: ChannelMeter, cutoff: float, *,
                 lfr: bool = True, steps: int | None = None, solver: str | None = None,
                 cfg_scale: float | None = None, seed: int = 0, rate: int | str | None = None,
                 progress: Progress | None = None, key: object = None, preview: float = 0.0,
                 block_seconds: float = BLOCK_SECONDS):
        if cfg_scale is not None and not math.isfinite(cfg_scale):
            raise ValueError(f"the guidance scale (cfg_scale) must be a finite number, got {cfg_scale}")
        self.up, self.sr, self.length, self.lfr = up, sr, length, lfr
        self.rate = output_rate(rate, sr)
        self.source = meter.source
        self.unique = sorted(set(self.source))
        self.rows = [self.unique.index(j) for j in self.source]
        gain = meter.gain[self.unique]  # [U]
        self.active = [k for k in range(len(self.unique)) if gain[k] > 0]
        gain_a = gain[self.active]  # [A]
        lr_len, self.out_len = output_length(length, sr), rate_length(length, sr, self.rate)
        frames, hop = up.latents.codec.num_frames(lr_len), up.latents.hop
        ctx, block = codec_context(up.latents.codec), max(1, round(block_seconds * up.latents.frame_rate))
        self.result = UpsampleResult(torch.empty(0), torch.empty(0), min(cutoff, SAMPLE_RATE / 2),
                                     self.out_len / self.rate, self.rate, len(self.source))
        self.cutoff = self.result.cutoff
        res, dev = self.result, up.device

        def timed(op, field):
            def f(x):
                tic = up._sync()
                y = op(x)
                setattr(res, field, getattr(res, field) + up._sync() - tic)
                return y
            return f

        def encode(x):  # [A, n] -> [A, Cz, f]
            return up.latents.encode((x * gain_a[:, None])[:, None].to(dev))

        def decode(z):  # [A, Cz, f] -> [A, f * hop] at the input's level
            return restore_level(up.latents.decode(z)[:, 0], gain_a).float().cpu()

        self.lr = resampler(sr, SAMPLE_RATE, length, block_seconds)
        self.encode = Local(timed(encode, "codec_s"), lr_len, frames, hop, 1, ctx, block)
        self.sampler = WindowSampler(up, frames, len(self.active), dict(steps=steps, solver=solver,
                                     cfg_scale=cfg_scale, seed=seed), self._progress, res)
        self.decode = Local(timed(decode, "codec_s"), frames, lr_len, 1, hop, ctx, block)
        self.out = None  # the model's output at the output rate
        if self.rate != SAMPLE_RATE:
            self.out = resampler(SAMPLE_RATE, self.rate, lr_len, block_seconds, self.out_len)
        self.preview = round(preview * self.rate)
        self.ref = None  # the input at the output rate (44.1 kHz: lr itself), delayed to meet the output
        if (lfr or self.preview) and self.rate != SAMPLE_RATE:
            self.ref = resampler(sr, self.rate, length, block_seconds, self.out_len)
        self.delay = Fifo() if lfr or self.preview else None
        ctx_lfr = -(-LFR_FFT // LFR_HOP)
        u = len(self.unique)

        def replace(seg):  # [2U, n]: output rows, then the input's
            return low_frequency_replace(seg[:u].clone(), seg[u:], self.cutoff, sr=self.rate)

        self.replace = Local(replace, self.out_len, self.out_len, LFR_HOP, LFR_HOP,
                             ctx_lfr, max(1, round(block_seconds * self.rate / LFR_HOP))) if lfr else None
        self.key, self.callback, self.windows_done = key, progress, 0
        self.total = len(self.sampler.ranges) * len(self.active)
        self.pushed = self.written = 0
        self._audio, self._input = [], []
        if progress:
            progress(key, 0, self.total)

    def _progress(self, n: int) -> None:
        self.windows_done += n
        if self.callback:
            self.callback(self.key, self.windows_done, self.total)

    @property
    def held(self) -> dict[str, int]:
        """The most samples (or frames) each stage has held at once: bounded by blocks, not by length."""
        stages = {"resample": self.lr, "encode": self.encode, "decode": self.decode, "output": self.out,
                  "reference": self.ref, "delay": self.delay, "replace": self.replace}
        held = {k: v.held for k, v in stages.items() if v is not None}
        return {**held, "windows": self.sampler.held}

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> torch.Tensor | None:
        """The next input block [C, n] -> the output samples now complete [C, m] (None when none are)."""
        tic = time.perf_counter()
        spent = self.result.network_s + self.result.codec_s
        self.pushed += x.shape[-1]
        xu = x[self.unique].float() if len(self.unique) < x.shape[0] else x.float()  # [U, n]
        lr = self.lr.push(xu)  # [U, n'] at 44.1 kHz
        if self.delay is not None:
            ref = self.ref.push(xu) if self.ref is not None else lr
            if ref is not None:
                self.delay.put(ref)
        y = self._model(lr)  # [U, n''] at 44.1 kHz
        if y is not None and self.out is not None:
            y = self.out.push(y)  # [U, m] at the output rate
        if y is not None and y.shape[-1] and self.delay is not None:
            ref = self.delay.take(y.shape[-1])
            self._keep(y, ref)
            if self.replace is not None:
                y = self.replace.push(torch.cat([y, ref]))
        if y is not None and not y.shape[-1]:
            y = None
        res = self.result
        res.other_s += time.perf_counter() - tic - (res.network_s + res.codec_s - spent)
        if y is None:
            return None
        self.written += y.shape[-1]
        if self.written == self.out_len:
            res.audio, res.input = self._preview(self._audio), self._preview(self._input)
        return y[self.rows] if self.rows != list(range(len(self.rows))) else y

    def _model(self, lr: torch.Tensor | None) -> torch.Tensor | None:
        """lr [U, n] -> the model's output [U, m] at 44.1 kHz as it completes (silent rows exactly 0)."""
        if not self.active:
            return lr.new_zeros(lr.shape) if lr is not None else None
        c = self.encode.push(lr[self.active]) if lr is not None else None
        z = self.sampler.push(c)
        y = self.decode.push(z) if z is not None else None
        if y is None or len(self.active) == len(self.unique):
            return y
        out = y.new_zeros(len(self.unique), y.shape[-1])
        out[self.active] = y
        return out

    def _keep(self, y: torch.Tensor, ref: torch.Tensor) -> None:
        have = sum(p.shape[-1] for p in self._audio)
        if have < self.preview:
            self._audio.append(y[:, : self.preview - have])
            self._input.append(ref[:, : self.preview - have])

    def _preview(self, parts: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(parts, -1) if parts else torch.zeros(len(self.unique), 0)
        return x[self.rows]


def upsample_file(up: Upsampler, path: str | Path, write: Callable[[torch.Tensor], None], *,
                  cutoff: float | str | None = "auto", block_seconds: float = BLOCK_SECONDS,
                  **kwargs) -> UpsampleResult:
    """Stream the file at `path` through `up`, handing each output block [C, m] to `write` in order.

    kwargs as for `UpsampleStream` (lfr, steps, solver, cfg_scale, seed, rate, progress, key, preview).
    AudioError naming the file for a bad input (before any model work).
    """
    path = Path(path)
    sr, length, meter = inspect_file(path, block_seconds)
    cut = file_cutoff(path, sr, meter.channels, length, cutoff)
    stream = UpsampleStream(up, sr, length, meter, cut, block_seconds=block_seconds, **kwargs)
    for block in read_blocks(path, max(1, round(block_seconds * sr))):
        y = stream.push(block)
        if y is not None:
            write(y)
    if stream.written != stream.out_len:
        raise RuntimeError(f"{path}: the stream gave {stream.written} of {stream.out_len} samples")
    return stream.result
