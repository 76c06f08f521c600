"""Upsampling (docs/design.md section 7): audio at any rate and channel count -> 44.1 kHz or above.

One signal [C, L] at rate sr goes through:
  1. cutoff: given, or estimated from the input spectrum (`band.estimate_cutoff`); at most sr / 2;
  2. the channels measured at the input's rate (`channels.ChannelMeter`): each one's level gain
     (`level_gain`'s definition: a fixed reference level, undone after decoding; a channel of digital
     silence skips the model and stays exactly zero) and which are copies of an earlier channel (a
     copy is not computed again: it takes its source's output);
  3. sinc resampling to 44.1 kHz (`band.resample_to_44k`): lr [C, L'], L' = ceil(L * 44100 / sr);
  4. encoding into the model's latent space (`LatentSpace.encode`), channels as a batch: c [C, Cz, T];
  5. windows of `window` frames overlapping by at least `overlap` frames (`window_ranges`), each
     sampled by the flow (the windows of several files share network batches), blended into one
     latent sequence with tapered weights (raised-cosine ramps over each overlap, divided by their
     sum, so they always add up to one);
  6. one decode (the codec chunks long input itself), the level gain undone, resampling to the output
     rate R (`rates.output_rate`: 44.1 kHz, 48 kHz or the input's rate; ceil(L * R / sr) samples), and
     low-frequency replacement at R: below the cutoff the output takes the spectrum of the input
     resampled to R (the input itself when sr == R) (`band.low_frequency_replace`);
  7. a check that the output is finite (`UpsampleResult.error` names the cause when it is not).

Blending latents rather than decoded audio: the decoder sees one continuous latent sequence (no
seam can appear in the audio that the latents do not have), and the overlaps are decoded once.
Noise: frame t of every channel starts from the same noise, drawn from (seed, t // NOISE_BLOCK)
(`frame_noise`, stream SHARED_NOISE), so overlapping windows share their noise and the result does not
depend on the window layout or on which other files share a batch (beyond float rounding). Shared
across channels, with each channel at the same reference level, a source panned into two channels
(L = a s, R = b s) gives the network the same input twice: it generates the same band for both, scaled
back by a and b, so the source stays where it was. Memory: the network never sees more than
`batch_size` windows of `window` frames; what grows with length here is the signal's own audio and
latents. Files stream instead (`jat.infer.stream`): the same stages a block at a time, flat in length.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from jat.checkpoint import hub, load
from jat.codecs import Codec
from jat.codecs.base import SAMPLE_RATE
from jat.codecs.latent import LatentSpace
from jat.data.audio import AudioError, restore_level
from jat.infer.band import estimate_cutoff, low_frequency_replace, resample_to_44k
from jat.infer.channels import measure
from jat.infer.rates import output_rate, rate_length, resample_blocks
from jat.infer.windows import SHARED_NOISE, frame_noise, window_ranges, window_weights
from jat.model.flow import Denoiser, FlowMatching
from jat.model.kernels import cast_linears_
from jat.runtime import tune_cpu_runtime

log = logging.getLogger(__name__)

MIN_SECONDS = 0.05  # shorter inputs are rejected

Progress = Callable[[object, int, int], None]  # (key, windows done, windows in total)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(device)


def pick_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """Network dtype: 'fp32', 'bf16' or 'auto' (bf16 where the hardware computes it natively: CUDA with
    bf16 support, or a CPU with AVX512-BF16/AMX, where it measured about 1.2-2x faster than fp32)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision '{precision}' (auto, fp32 or bf16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private oneDNN query; absent from some builds
        native = False
    return torch.bfloat16 if native else torch.float32


# --- the upsampler ------------------------------------------------------------------------------


class UpsampleError(RuntimeError):
    """The upsampler's output is unusable (not finite); the message names the cause."""


@dataclass
class UpsampleResult:
    """One upsampled signal: audio [C, L'] at `sample_rate` and where the time went (seconds). A streamed
    file (`jat.infer.stream`) keeps only the first `preview` seconds of `audio` and `input` here."""

    audio: torch.Tensor  # [C, L'] the output at `sample_rate`
    input: torch.Tensor  # [C, L'] the input resampled to `sample_rate` (its low band is the output's)
    cutoff: float
    duration: float  # seconds of audio
    sample_rate: int = SAMPLE_RATE
    channels: int = 0  # the output's channel count
    network_s: float = 0.0
    codec_s: float = 0.0
    other_s: float = 0.0  # loading aside: cutoff detection, resampling, low-frequency replacement
    error: str | None = None  # why `audio` is unusable (it holds NaN/Inf), else None

    @property
    def rtf(self) -> dict[str, float]:
        """Real-time factors (processing seconds per audio second): total, network, codec, other."""
        parts = {"network": self.network_s, "codec": self.codec_s, "other": self.other_s}
        total = sum(parts.values())
        return {"total": total / self.duration, **{k: v / self.duration for k, v in parts.items()}}


@dataclass
class _Job:
    """One signal in flight: its condition, windows, and the running blend of its sampled windows."""

    key: object
    lr: torch.Tensor  # [U, L'] CPU: the distinct channels at 44.1 kHz
    source: list[int]  # the output's channel k is distinct channel `unique.index(source[k])`
    unique: list[int]  # the distinct channels (source[k] == k)
    gain: torch.Tensor  # [U] `level_gain` of each distinct channel (0: silent)
    active: list[int]  # rows of lr that are not silent: only these go through the network
    c: torch.Tensor | None  # [A, Cz, T] normalised condition of the active rows, on the device
    ranges: list[tuple[int, int]]
    result: UpsampleResult
    acc: torch.Tensor | None  # [A, Cz, T] weighted sum of the sampled windows
    wsum: torch.Tensor  # [T] sum of the weights
    ref: torch.Tensor | None = None  # [U, n] the input at the output rate, where that is not 44.1 kHz
    length: int = 0  # output samples at the output rate
    done: int = 0

    @property
    def total(self) -> int:
        return len(self.ranges) * len(self.active)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """[U, n] rows of the distinct channels -> [C, n]: every copy takes its source's row."""
        rows = [self.unique.index(j) for j in self.source]
        return x if rows == list(range(len(rows))) else x[rows]


class Upsampler:
    """A trained model with its latent space (codec and normalisation) and sampler.

    Every signal is level-normalised on its way through (`level_gain`), so the output scales with
    the input and digital silence stays silent.

    Args:
        model: an x-predicting denoiser (model(x_t, t, c, mask) -> x̂), usually a JaT.
        window_seconds: frames per window (default 6 s; `from_checkpoint`: the training segment).
        overlap_seconds: minimum overlap of neighbouring windows (blended across it).
        batch_size: windows per network call (default 16 on CUDA, 4 on CPU).
        precision: network precision, 'fp32', 'bf16' or 'auto' (`pick_precision`).
    """

    def __init__(self, model: Denoiser, latents: LatentSpace, flow: FlowMatching,
                 device: torch.device | str = "cpu", *, window_seconds: float | None = None,
                 overlap_seconds: float = 1.0, batch_size: int | None = None, precision: str = "fp32"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.latents = latents.to(self.device).eval()
        self.flow = flow
        self.cfg = None  # the checkpoint's Config (`from_checkpoint`)
        self.checkpoint: Path | None = None  # where the weights came from (`from_checkpoint`), for messages
        rate = latents.frame_rate
        self.window = max(1, round((window_seconds or 6.0) * rate))
        self.overlap = min(round(overlap_seconds * rate), self.window // 2)
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 4)
        self.dtype = pick_precision(self.device, precision)
        if self.dtype == torch.bfloat16:
            cast_linears_(self.model, torch.bfloat16)  # cast once, not at every sampler step
        if self.device.type == "cpu":
            tune_cpu_runtime()  # the model is final: keep freed activations for reuse (jat/runtime.py)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", ema: bool = True,
                        codec: Codec | None = None, precision: str = "auto",
                        adapter: str | Path | None = None, force_adapter: bool = False,
                        **kwargs) -> Upsampler:
        """Load a checkpoint directory (or its weights.safetensors, or `hf://org/name[@rev]` from the
        Hugging Face Hub, `jat.checkpoint.hub`); EMA weights by default.

        `adapter` (an adapter file or a LoRA training checkpoint) goes on top of the checkpoint; a LoRA
        training checkpoint given alone loads onto its base (its train.init_from); a merged checkpoint
        loads like any other. Raises CheckpointError (one line) when the weights, the latent
        statistics or the codec do not fit the stored config. kwargs go to the constructor.
        """
        dev = pick_device(device)
        path = hub.resolve(path)  # hf://org/name: the local snapshot of that Hub repository
        model, cfg, base = load.load_model(path, adapter, ema, dev, force=force_adapter)
        latents = load.latent_space(base, cfg, codec)
        kwargs.setdefault("window_seconds", cfg.data.segment_seconds)
        up = cls(model, latents, FlowMatching(cfg.flow, latents.norm), dev, precision=precision, **kwargs)
        up.cfg, up.checkpoint = cfg, Path(path)
        return up

    def aim_envelope(self, aim: float) -> None:
        """Generate the band at `aim` (sets flow.sample_aim) of a checkpoint trained with flow.envelope_target
        lognormal: 0 the band's typical level (what log-spectral distance rewards), 1 its mean power
        (what the energy per octave measures); ValueError for another target or an aim outside [0, 1]."""
        if self.flow.cfg.envelope_target != "lognormal" or not 0 <= aim <= 1:
            raise ValueError(f"envelope aim {aim:g}: needs a checkpoint trained with flow.envelope_target "
                             "lognormal and a value in [0, 1]")
        self.flow.cfg.sample_aim = float(aim)

    @classmethod
    def from_pretrained(cls, name: str | Path, revision: str | None = None, **kwargs) -> Upsampler:
        """An inference folder (`jat-export`) from the Hugging Face Hub (`org/name`, at `revision`), or a
        local folder or checkpoint; kwargs as for `from_checkpoint`."""
        if revision and hub.is_hub_name(name):
            name = f"{hub.PREFIX}{str(name).removeprefix(hub.PREFIX).partition('@')[0]}@{revision}"
        return cls.from_checkpoint(name, **kwargs)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.no_grad()
    def sample_latents(self, c: torch.Tensor, steps: int | None = None, solver: str | None = None,
                       cfg_scale: float | None = None, seed: int = 0, noise: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised LR latents c [B, C, T] -> normalised HR latents [B, C, T].

        Default noise: `frame_noise` with stream b for batch row b (independent signals).
        """
        if noise is None:
            B, C, T = c.shape
            noise = torch.stack([frame_noise(seed, b, 0, T, C) for b in range(B)])  # [B, C, T]
        with self._autocast():
            return self.flow.sample(self.model, c, mask=mask, steps=steps, solver=solver, cfg_scale=cfg_scale,
                                    noise=noise.to(self.device))

    @torch.no_grad()
    def sample_windows(self, rows: list[tuple[torch.Tensor, int]], steps: int | None = None,
                       solver: str | None = None, cfg_scale: float | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, float]:
        """Windows (c [Cz, w] on the device, first frame s) of one or more signals, sampled as one batch
        from the shared noise of their frames: (x [B, Cz, max w] zero-padded, network seconds)."""
        sizes = [c.shape[-1] for c, _ in rows]
        width = max(sizes)
        c = torch.zeros(len(rows), rows[0][0].shape[0], width, device=self.device)  # [B, Cz, W]
        noise = torch.zeros(c.shape)  # [B, Cz, W]
        for b, (cw, s) in enumerate(rows):
            c[b, :, : sizes[b]] = cw
            noise[b, :, : sizes[b]] = frame_noise(seed, SHARED_NOISE, s, s + sizes[b], c.shape[1])
        mask = None
        if min(sizes) < width:
            valid = torch.tensor(sizes, device=self.device)[:, None]  # [B, 1]
            mask = torch.arange(width, device=self.device)[None] < valid  # [B, W]
        tic = self._sync()
        x = self.sample_latents(c, steps, solver, cfg_scale, noise=noise, mask=mask)  # [B, Cz, W]
        return x, self._sync() - tic

    def upsample(self, audio: torch.Tensor, sr: int, **kwargs) -> UpsampleResult:
        """Audio [C, L] at `sr` -> UpsampleResult with audio [C, ceil(L * R / sr)] at the output rate R
        (44.1 kHz unless `output_rate` says otherwise).

        kwargs as for `upsample_many`. Raises UpsampleError when the output is not finite.
        """
        result = next(self.upsample_many([(None, audio, sr)], **kwargs))[1]
        if result.error is not None:
            raise UpsampleError(result.error)
        return result

    @torch.no_grad()
    def upsample_many(self, items: Iterable[tuple[object, torch.Tensor, int]], *,
                      cutoff: float | str | None = "auto", lfr: bool = True, steps: int | None = None,
                      solver: str | None = None, cfg_scale: float | None = None, seed: int = 0,
                      output_rate: int | str | None = None,
                      progress: Progress | None = None) -> Iterator[tuple[object, UpsampleResult]]:
        """Upsample (key, audio [C, L], sr) items, yielding (key, UpsampleResult) in input order.

        Items are read lazily; windows of consecutive items share network batches. cutoff: Hz, or
        'auto'/None to estimate it per item. lfr: keep the input's spectrum below the cutoff.
        output_rate: Hz (at least 44.1 kHz), or 'input' (`rates.output_rate`); default 44.1 kHz.
        progress(key, done, total) is called as windows finish. A result whose audio is not finite
        carries the reason in `error` (the other items go on). A non-finite cfg_scale is a ValueError
        before any work.
        """
        if cfg_scale is not None and not math.isfinite(cfg_scale):
            raise ValueError(f"the guidance scale (cfg_scale) must be a finite number, got {cfg_scale}")
        queue: deque = deque()  # (job, window index, active row)
        jobs: deque[_Job] = deque()
        items = iter(items)
        more = True
        while True:
            while more and len(queue) < self.batch_size:
                item = next(items, None)
                if item is None:
                    more = False
                    break
                job = self._prepare(*item, cutoff, output_rate)
                item = None  # the input at its own rate is no longer needed
                jobs.append(job)
                queue.extend((job, i, a) for i in range(len(job.ranges)) for a in range(len(job.active)))
                if progress:
                    progress(job.key, 0, job.total)
            while jobs and jobs[0].done == jobs[0].total:  # before any batch too: silence needs none
                job = jobs.popleft()
                yield job.key, self._finish(job, lfr)
            if not queue:
                break
            self._run_batch([queue.popleft() for _ in range(min(self.batch_size, len(queue)))],
                            steps, solver, cfg_scale, seed, progress)

    # --- the three stages ---------------------------------------------------------------------------

    def _prepare(self, key: object, audio: torch.Tensor, sr: int, cutoff: float | str | None,
                 rate: int | str | None) -> _Job:
        check_signal(audio, sr, key)
        rate = output_rate(rate, sr)
        tic = time.perf_counter()
        audio = audio.float()
        cut = estimate_cutoff(audio, sr) if cutoff in (None, "auto") else min(float(cutoff), sr / 2)
        meter = measure(audio)
        source = meter.source
        unique = sorted(set(source))
        audio = audio[unique] if len(unique) < len(source) else audio  # [U, L]
        gain = meter.gain[unique]  # [U]
        lr = resample_to_44k(audio, sr)  # [U, L']
        active = [k for k in range(lr.shape[0]) if gain[k] > 0]
        length = rate_length(audio.shape[-1], sr, rate)
        ref = None if rate == SAMPLE_RATE else resample_blocks(audio, sr, rate, length)  # [U, n]
        del audio
        result = UpsampleResult(torch.empty(0), torch.empty(0), min(cut, SAMPLE_RATE / 2), length / rate,
                                rate, len(source))
        toc = self._sync()
        scaled = (lr[active] * gain[active, None])[:, None].to(self.device)  # [A, 1, L'] at the ref. level
        c = self.latents.encode(scaled)  # [A, Cz, T]
        del scaled
        result.other_s, result.codec_s = toc - tic, self._sync() - toc
        T = self.latents.codec.num_frames(lr.shape[-1])
        ranges = window_ranges(T, self.window, self.overlap)
        return _Job(key, lr, source, unique, gain, active, c, ranges, result, torch.zeros_like(c),
                    torch.zeros(T, device=self.device), ref, length)

    def _run_batch(self, batch: list, steps, solver, cfg_scale, seed, progress: Progress | None) -> None:
        rows = [(job.c[a, :, job.ranges[i][0] : job.ranges[i][1]], job.ranges[i][0]) for job, i, a in batch]
        x, elapsed = self.sample_windows(rows, steps, solver, cfg_scale, seed)  # [B, Cz, W]
        sizes = [c.shape[-1] for c, _ in rows]
        for b, (job, i, a) in enumerate(batch):
            s, e = job.ranges[i]
            w = window_weights(job.ranges, i).to(self.device)  # [e - s]
            job.acc[a, :, s:e] += x[b, :, : e - s] * w
            if a == 0:  # every active row has the same windows: count them once
                job.wsum[s:e] += w
            job.result.network_s += elapsed * sizes[b] / sum(sizes)
            job.done += 1
            if progress:
                progress(job.key, job.done, job.total)

    def _finish(self, job: _Job, lfr: bool) -> UpsampleResult:
        res = job.result
        tic = self._sync()
        out = torch.zeros_like(job.lr)  # [U, L'] silent rows stay exactly zero
        if job.active:  # (digital silence throughout: nothing to generate, nothing to decode)
            z = job.acc.div_(job.wsum)  # [A, Cz, T] blended
            job.acc = job.c = None
            y = self.latents.decode(z, length=job.lr.shape[-1], inplace=True)[:, 0]  # [A, L'] (z reused)
            del z
            out[job.active] = restore_level(y, job.gain[job.active]).float().cpu()  # at the input's level
            del y
        job.acc = job.c = None
        toc = self._sync()
        ref = job.lr
        if job.ref is not None:  # the model's output and the input's band at the output rate
            out, ref = resample_blocks(out, SAMPLE_RATE, res.sample_rate, job.length), job.ref
        if lfr:
            out = low_frequency_replace(out, ref, res.cutoff, sr=res.sample_rate)
        res.audio, res.input = job.expand(out.float()), job.expand(ref)
        job.ref = None
        if not bool(torch.isfinite(res.audio).all()):
            res.error = self.nonfinite_cause()
        res.codec_s += toc - tic
        res.other_s += self._sync() - toc
        return res

    def nonfinite_cause(self) -> str:
        """Why an output came out non-finite. The input (checked by `check_signal`) and the guidance
        scale (checked by `upsample_many`) are finite, so it is the network's numbers: its weights, or
        their precision when that is bf16."""
        where = f"checkpoint {self.checkpoint}; " if self.checkpoint is not None else ""
        fix = "--precision fp32 or " if self.dtype == torch.bfloat16 else ""
        return f"the network produced non-finite values ({where}try {fix}another checkpoint)"


def check_signal(audio: torch.Tensor, sr: int, name: object = None) -> None:
    """Raise AudioError (naming `name`) unless audio is [C, L], finite and at least MIN_SECONDS long."""
    prefix = f"{name}: " if name is not None else ""
    if audio.dim() != 2 or audio.shape[0] == 0:
        raise AudioError(f"{prefix}expected audio shaped [channels, samples], got {tuple(audio.shape)}")
    if audio.shape[-1] == 0:
        raise AudioError(f"{prefix}audio is empty (0 samples)")
    if audio.shape[-1] < MIN_SECONDS * sr:
        raise AudioError(f"{prefix}too short ({audio.shape[-1] / sr * 1000:.1f} ms; "
                         f"at least {MIN_SECONDS * 1000:.0f} ms needed)")
    if not bool(torch.isfinite(audio).all()):
        raise AudioError(f"{prefix}{int((~torch.isfinite(audio)).sum())} NaN/Inf samples")
