"""End-to-end real-time factor of the inference path users run, split into its stages.

A file goes through `jat.infer.stream.upsample_file` (what `jat-infer` runs for every file: streaming, the
cutoff found from the input) into a 16-bit wav written block by block, as the command line writes it.
The model is a config's preset with random weights and the config's codec (DAC: the real 44 kHz
architecture with random weights, in the form `codec.dac_fast` gives; time depends on neither's weights);
the sampler is Euler with guidance off, so steps are network evaluations. Each stage's clock:

  read     the file's two passes (`read_blocks`) and the cutoff's excerpts (`read_samples`)
  encode   `LatentSpace.encode` (codec and normalisation)
  network  the sampler (the stream's own `network_s`)
  decode   `LatentSpace.decode`
  lfr      low-frequency replacement (`low_frequency_replace`)
  write    writing the output blocks and closing the file
  other    the rest of the wall time: cutoff detection, resampling, level metering, window blending

Stages are timed by wrapping those functions for the duration of a run (`stage_clocks`), on a CUDA
device synchronised, so the stages add up to the wall time by construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import nn

from jat.codecs import LATENT_DIMS, DACCodec, LatentNorm, MDCTCodec
from jat.codecs.base import SAMPLE_RATE
from jat.codecs.latent import LatentSpace
from jat.evaluation.benchmark import named_config
from jat.infer.upsampler import Upsampler
from jat.model.dit import JaT
from jat.model.flow import FlowMatching

STAGES = ("read", "encode", "network", "decode", "lfr", "write", "other")


def write_input(path: Path, seconds: float, cutoff: float = 8000.0, seed: int = 0) -> Path:
    """A mono 44.1 kHz 16-bit wav of white noise at -20 dBFS RMS with nothing above `cutoff` Hz."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SAMPLE_RATE)
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[np.fft.rfftfreq(n, 1 / SAMPLE_RATE) > cutoff] = 0
    x = np.fft.irfft(spec, n)
    sf.write(str(path), (0.1 * x / x.std()).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return path


def build_upsampler(name: str, codec: str | None = None, device: str = "cpu", dac_dtype: str = "fp32",
                    precision: str = "auto") -> Upsampler:
    """configs/<name>.yaml's model (random weights, every parameter non-zero) on its codec, or on `codec`
    (`mdct` or `dac`) with the model's input channels to match; DAC as the real architecture, fast form."""
    cfg = named_config(name)
    codec = codec or cfg.codec.name
    channels = LATENT_DIMS[codec]
    torch.manual_seed(0)
    model = JaT(dataclasses.replace(cfg.model, in_channels=channels))
    for p in model.parameters():  # non-zero gates: every block does its real work
        if p.dim() < 2:
            nn.init.normal_(p, std=0.02)
    if codec == "dac":
        import dac

        backend = DACCodec(dac.DAC(), chunk_seconds=cfg.codec.chunk_seconds, fast=cfg.codec.dac_fast,
                           dtype=dac_dtype)
    else:
        backend = MDCTCodec(compression=cfg.codec.mdct_compression, chunk_seconds=cfg.codec.chunk_seconds)
    latents = LatentSpace(backend.eval(), LatentNorm.identity(channels), name=codec)
    return Upsampler(model, latents, FlowMatching(cfg.flow), device,
                     window_seconds=cfg.data.segment_seconds, precision=precision)


@contextlib.contextmanager
def stage_clocks(up: Upsampler, times: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent reading, encoding, decoding and replacing the low band to `times` while
    `up` streams files (module docstring)."""
    import jat.infer.stream as stream

    def clocked(fn, key):
        def f(*args, **kwargs):
            tic = up._sync()
            out = fn(*args, **kwargs)
            times[key] += up._sync() - tic
            return out
        return f

    def read_blocks(*args, **kwargs):  # a generator: its clock runs only while it reads
        blocks = originals["read_blocks"](*args, **kwargs)
        while True:
            tic = time.perf_counter()
            block = next(blocks, None)
            times["read"] += time.perf_counter() - tic
            if block is None:
                return
            yield block

    originals = {k: getattr(stream, k) for k in ("read_blocks", "read_samples", "low_frequency_replace")}
    latents = up.latents
    try:
        stream.read_blocks = read_blocks
        stream.read_samples = clocked(originals["read_samples"], "read")
        stream.low_frequency_replace = clocked(originals["low_frequency_replace"], "lfr")
        latents.encode = clocked(type(latents).encode.__get__(latents), "encode")
        latents.decode = clocked(type(latents).decode.__get__(latents), "decode")
        yield
    finally:
        for k, v in originals.items():
            setattr(stream, k, v)
        for k in ("encode", "decode"):
            latents.__dict__.pop(k, None)


def pipeline_rtf(up: Upsampler, path: Path, out: Path, evaluations: int, seed: int = 0) -> dict[str, float]:
    """Stream the file at `path` through `up` into `out` with `evaluations` Euler steps: each stage's
    seconds (`<stage>_s`) and real-time factor (`<stage>_rtf`), `total_s` and `rtf` (total over the audio's
    seconds)."""
    from jat.infer.stream import upsample_file

    times = dict.fromkeys(STAGES, 0.0)
    info = sf.info(str(path))
    tic = time.perf_counter()
    with stage_clocks(up, times):
        f = sf.SoundFile(str(out), "w", samplerate=info.samplerate, channels=info.channels, subtype="PCM_16")

        def write(y: torch.Tensor) -> None:  # [C, m]
            t = time.perf_counter()
            f.write(y.clamp(-1, 1).T.numpy())
            times["write"] += time.perf_counter() - t

        try:
            result = upsample_file(up, path, write, steps=evaluations, solver="euler", cfg_scale=1.0,
                                   seed=seed)
        finally:
            t = time.perf_counter()
            f.close()
            times["write"] += time.perf_counter() - t
    total = time.perf_counter() - tic
    times["network"] = result.network_s
    times["other"] = total - sum(v for k, v in times.items() if k != "other")
    seconds = info.frames / info.samplerate
    row = {"audio_seconds": seconds, "evaluations": evaluations, "total_s": total, "rtf": total / seconds}
    row.update({f"{k}_s": v for k, v in times.items()})
    row.update({f"{k}_rtf": v / seconds for k, v in times.items()})
    return row


def rtf_rows(configs: list[str], seconds: list[float], evaluations: list[int], work: Path,
             long_evaluations: list[int] | None = None, codec: str | None = None, device: str = "cpu",
             dac_dtype: str = "fp32") -> Iterator[dict]:
    """`pipeline_rtf` rows for every config x input length x evaluation count, each config warmed up first
    on a short file; inputs longer than the shortest use `long_evaluations` (default: the same counts).
    Rows carry `config` and `codec`; yielded as they finish."""
    work.mkdir(parents=True, exist_ok=True)
    inputs = {s: write_input(work / f"in_{s:g}s.wav", s) for s in seconds}
    warm = write_input(work / "warm.wav", 2.0)
    for name in configs:
        up = build_upsampler(name, codec, device, dac_dtype)
        pipeline_rtf(up, warm, work / "out.wav", 1)
        codec_name = type(up.latents.codec).__name__.removesuffix("Codec").lower()
        for s in seconds:
            counts = evaluations if s == min(seconds) or long_evaluations is None else long_evaluations
            for n in counts:
                row = pipeline_rtf(up, inputs[s], work / "out.wav", n)
                yield {"config": name, "codec": codec_name, **row}
        del up


def format_rtf_rows(rows: list[dict]) -> str:
    """`rtf_rows` as a table: seconds per stage, the total and the real-time factor."""
    head = f"{'config':<7}{'codec':<6}{'audio s':>8}{'evals':>6}" + "".join(f"{k:>9}" for k in STAGES)
    lines = [head + f"{'total':>9}{'RTF':>8}"]
    for r in rows:
        stages = "".join(f"{r[f'{k}_s']:>9.2f}" for k in STAGES)
        lines.append(f"{r['config']:<7}{r['codec']:<6}{r['audio_seconds']:>8g}{r['evaluations']:>6}{stages}"
                     f"{r['total_s']:>9.2f}{r['rtf']:>8.3f}")
    return "\n".join(lines)
