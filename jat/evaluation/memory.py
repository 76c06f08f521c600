"""Peak memory of streaming inference against the input's length (docs/design.md section 7).

Each length runs in a fresh child process (`python -m jat.evaluation.memory --child ...`) that streams
one file through an Upsampler and writes the output; the figure is that child's peak resident memory, the
whole process included (Python, torch, the model): its own high-water mark (`VmHWM` in /proc/self/status,
which starts afresh at exec), or where there is no /proc, `os.wait4`'s ru_maxrss (which on Linux would
also count the resident size of whichever process started the child). The model is a randomly
initialised preset on the weight-free MDCT codec: memory, not quality, is measured, and the network's
share is the same at every length. Input files are written a block at a time, so making a 60-minute file
needs no more memory than a 1-minute one.

    python -m jat.evaluation.memory [--minutes 1 10 60] [--channels 2] [--sr 48000] [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

WRITE_SECONDS = 10.0  # seconds per block when writing the test input


def write_test_input(path: Path, minutes: float, channels: int = 2, sr: int = 48000, seed: int = 0) -> Path:
    """A `minutes`-long 16-bit wav of independent noise per channel at -20 dBFS RMS, written in blocks."""
    rng = np.random.default_rng(seed)
    total, block = round(minutes * 60 * sr), round(WRITE_SECONDS * sr)
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=channels, subtype="PCM_16") as f:
        for a in range(0, total, block):
            f.write((0.1 * rng.standard_normal((min(block, total - a), channels))).astype(np.float32))
    return path


def _child(path: Path, out: Path, preset: str, steps: int) -> None:
    """Stream `path` into `out` through a random `preset` model on the MDCT codec (the measured process)."""
    import torch

    from jat.codecs import LatentNorm, MDCTCodec
    from jat.codecs.latent import LatentSpace
    from jat.config import Config
    from jat.infer.stream import upsample_file
    from jat.infer.upsampler import Upsampler
    from jat.model.dit import JaT
    from jat.model.flow import FlowMatching

    torch.manual_seed(0)
    cfg = Config.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "small.yaml",
                           [f"model.preset={preset}"])
    up = Upsampler(JaT(cfg.model), LatentSpace(MDCTCodec(), LatentNorm.identity(cfg.model.in_channels)),
                   FlowMatching(cfg.flow), window_seconds=cfg.data.segment_seconds, precision="fp32")
    info = sf.info(str(path))
    tic = time.perf_counter()
    with sf.SoundFile(str(out), "w", samplerate=44100, channels=info.channels, subtype="FLOAT") as f:
        res = upsample_file(up, path, lambda y: f.write(y.T.numpy()), steps=steps)
    seconds = time.perf_counter() - tic
    print(json.dumps({"seconds": seconds, "audio_s": res.duration, "peak_kb": _own_peak_kb()}))


def _own_peak_kb() -> int | None:
    """This process's peak resident memory in KiB since its exec (VmHWM), or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def streaming_peak_memory(minutes=(1, 10, 60), channels: int = 2, sr: int = 48000, steps: int = 1,
                          preset: str = "tiny", workdir: str | Path | None = None) -> list[dict]:
    """Rows {minutes, channels, sr, steps, peak_mb, seconds, rtf}: the peak resident memory (MB) of a
    child process streaming a file of each length, and the time the streaming took (seconds)."""
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for m in minutes:
            src, out = Path(tmp) / f"in_{m}.wav", Path(tmp) / f"out_{m}.wav"
            write_test_input(src, m, channels, sr)
            cmd = [sys.executable, "-m", "jat.evaluation.memory", "--child", str(src), str(out), preset,
                   str(steps)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            stdout, stderr = proc.stdout.read(), proc.stderr.read()
            if proc.returncode != 0:
                raise RuntimeError(f"the {m}-minute streaming run failed: {stderr.strip()[-2000:]}")
            got = json.loads(stdout.strip().splitlines()[-1])
            rows.append({"minutes": m, "channels": channels, "sr": sr, "steps": steps,
                         "peak_mb": (got["peak_kb"] or usage.ru_maxrss) / 1024,  # both in KiB on Linux
                         "seconds": got["seconds"], "rtf": got["seconds"] / got["audio_s"]})
            src.unlink()
            out.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(Path(argv[1]), Path(argv[2]), argv[3], int(argv[4]))
        return 0
    ap = argparse.ArgumentParser(description="Peak memory of streaming inference for several input lengths.")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--sr", type=int, default=48000)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workdir", default=None, help="where the test files go (default: the system's temp)")
    args = ap.parse_args(argv)
    rows = streaming_peak_memory(args.minutes, args.channels, args.sr, args.steps, args.preset, args.workdir)
    print(f"({args.channels} ch, {args.sr} Hz, {args.steps} step, {args.preset} model, MDCT codec)")
    print(format_rows(rows))
    return 0


def max_over_min(rows: list[dict]) -> float:
    """The flatness of the peaks: the largest over the smallest."""
    peaks = [r["peak_mb"] for r in rows]
    return max(peaks) / min(peaks)


def format_rows(rows: list[dict]) -> str:
    """`streaming_peak_memory`'s rows as a table, with the flatness of the peaks under it."""
    lines = [f"{'minutes':>8} {'peak MB':>9} {'seconds':>9} {'RTF':>7}"]
    lines += [f"{r['minutes']:>8g} {r['peak_mb']:>9.0f} {r['seconds']:>9.1f} {r['rtf']:>7.3f}" for r in rows]
    return "\n".join(lines + [f"max / min peak: {max_over_min(rows):.2f}x"])


if __name__ == "__main__":
    sys.exit(main())
