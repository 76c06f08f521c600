"""Upsample audio files with a trained JaT-AudioSR checkpoint (the model runs at 44.1 kHz).

    python scripts/infer.py INPUT [INPUT ...] --checkpoint CKPT [--output-dir DIR] [--steps N]
        [--solver euler|heun] [--cfg W] [--seed S] [--cutoff HZ|auto] [--no-lfr] [--plot]
        [--output-rate 44100|48000|input] [--format wav|flac] [--overwrite] [--device auto|cpu|cuda]

INPUT: files (wav, flac, ogg, anything soundfile reads; any rate, any channel count), folders
(searched recursively) or globs ("music/**/*.flac"). Each input name.ext gives name_jat.wav beside it,
or in --output-dir, at --output-rate (default 44100; `input`: the input's own rate where it is higher).
Files stream through in blocks, so memory does not grow with their length; a progress bar per file
shows the time left. Existing outputs are kept unless --overwrite; inputs are never written.
Exit status: 0 when every file was written, 1 when any failed, 2 for a bad checkpoint or arguments
(an unusable --output-dir included: it is checked before the checkpoint is loaded). Legal but odd
settings (very many steps, a guidance scale outside 1-10, a cutoff outside the training range) print
a warning and go on.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from jat.checkpoint.store import CheckpointError, resolve_checkpoint
from jat.codecs.base import SAMPLE_RATE
from jat.config import ConfigError
from jat.data.audio import AudioError
from jat.infer.files import FORMATS, expand_inputs, plan, upsample_files
from jat.infer.rates import OUTPUT_RATES
from jat.infer.upsampler import Upsampler

MAX_USEFUL_STEPS = 256  # more sampler steps than this rarely change the result
CFG_USUAL = (1.0, 10.0)  # guidance scales outside this range are rarely what was meant


def parse_cutoff(text: str) -> float | str:
    """'auto', '8000', '8k', '11.025kHz' -> 'auto' or Hz."""
    t = text.strip().lower().removesuffix("hz")
    if t == "auto":
        return t
    try:
        hz = float(t[:-1]) * 1000 if t.endswith("k") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cutoff must be 'auto' or a frequency in Hz (e.g. 8000 or 8k), "
                                         f"got '{text}'") from None
    if not 0 < hz <= SAMPLE_RATE / 2:
        raise argparse.ArgumentTypeError(f"cutoff must be in (0, {SAMPLE_RATE // 2}] Hz, got {hz:g}")
    return hz


def number(kind, positive: bool = False):
    """An argparse type: a finite `kind` (nan and inf are no settings), > 0 if `positive`."""
    def f(text: str):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return f


def positive(kind):
    return number(kind, positive=True)


def setting_warnings(args: argparse.Namespace, up: Upsampler) -> list[str]:
    """Warnings for legal settings that are probably mistakes, judged against the checkpoint's config."""
    cfg = up.cfg
    lines = []
    if args.steps is not None and args.steps > MAX_USEFUL_STEPS:
        lines.append(f"--steps {args.steps}: more than {MAX_USEFUL_STEPS} steps rarely helps and takes "
                     f"{args.steps / cfg.flow.steps:.0f} x longer than the default {cfg.flow.steps}")
    lo, hi = CFG_USUAL
    if args.cfg is not None and not lo <= args.cfg <= hi:
        effect = ("below 1 weakens the input's hold on the result (0 ignores the input, a negative scale "
                  "pushes away from it)" if args.cfg < lo else
                  f"above {hi:g} exaggerates the guidance and tends to distort")
        lines.append(f"--cfg {args.cfg:g}: a guidance scale {effect}; the usual range is {lo:g}-{hi:g}")
    if args.cutoff != "auto":
        given = f"--cutoff {args.cutoff:g} Hz"
        trained = f"the {cfg.data.cutoff_min:g}-{cfg.data.cutoff_max:g} Hz range the model was trained on"
        if args.cutoff < cfg.data.cutoff_min:
            lines.append(f"{given} is below {trained}; everything above it is regenerated")
        elif args.cutoff > cfg.data.cutoff_max:
            lines.append(f"{given} is above {trained}; it never learned to fill so narrow a band")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders or globs")
    ap.add_argument("--checkpoint", required=True, help="a ckpt-* directory, its weights.safetensors, or a "
                    "run directory (its newest checkpoint)")
    ap.add_argument("--output-dir", default=None, help="write here instead of beside each input")
    ap.add_argument("--steps", type=positive(int), default=None, help="sampler steps (default: the config's)")
    ap.add_argument("--solver", choices=("euler", "heun"), default=None, help="default: the config's")
    ap.add_argument("--cfg", type=number(float), default=None, help="classifier-free guidance scale "
                    "(1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--envelope-aim", type=float, default=None, help="a lognormal-envelope checkpoint's "
                    "band level: 0 its typical level .. 1 its mean power (default: flow.sample_aim)")
    ap.add_argument("--cutoff", type=parse_cutoff, default="auto", help="input band limit in Hz, or auto")
    ap.add_argument("--no-lfr", action="store_true", help="do not keep the input's spectrum below the cutoff")
    ap.add_argument("--plot", action="store_true", help="also write name_jat.png: input and output "
                    "spectrograms")
    ap.add_argument("--output-rate", choices=OUTPUT_RATES, default="44100", help="output sample rate "
                    "(input: the input's rate where it is above 44.1 kHz); the model runs at 44.1 kHz")
    ap.add_argument("--format", choices=FORMATS, default="wav")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="network precision (auto: bf16 where the hardware supports it)")
    ap.add_argument("--window", type=positive(float), default=None, help="window seconds (default: the "
                    "training segment length)")
    ap.add_argument("--overlap", type=positive(float), default=1.0, help="window overlap in seconds")
    ap.add_argument("--batch-size", type=positive(int), default=None, help="windows per network call")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    ap.add_argument("--adapter", default=None, help="LoRA/QLoRA adapter (adapter.safetensors or a LoRA "
                    "training checkpoint) applied on top of --checkpoint")
    ap.add_argument("--force-adapter", action="store_true", help="apply --adapter even though it records "
                    "another base checkpoint than --checkpoint")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # summary lines appear as files finish
    if args.seed < 0:
        print("error: --seed must be >= 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    inputs, errors = expand_inputs(args.inputs)
    try:  # the outputs first: a folder that cannot take them should not cost a checkpoint load
        tasks, plan_errors = plan(inputs, args.output_dir, args.format, args.overwrite, args.plot)
    except AudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        up = Upsampler.from_checkpoint(ckpt, device=args.device, ema=not args.no_ema, adapter=args.adapter,
                                       force_adapter=args.force_adapter,
                                       precision=args.precision, window_seconds=args.window,
                                       overlap_seconds=args.overlap, batch_size=args.batch_size)
        if args.envelope_aim is not None:
            up.aim_envelope(args.envelope_aim)
    except (CheckpointError, ConfigError, RuntimeError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

    for line in setting_warnings(args, up):
        print(f"warning: {line}", file=sys.stderr)
    errors += plan_errors
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    print(f"{len(tasks)} file(s) to upsample on {up.device} ({str(up.dtype).removeprefix('torch.')}), "
          f"checkpoint {ckpt}")

    bars: dict[Path, tqdm] = {}  # by output file, which plan makes unique

    def progress(task, done: int, total: int) -> None:
        if args.quiet:
            return
        bar = bars.get(task.output)
        if bar is None:
            bar = bars[task.output] = tqdm(total=total, desc=task.input.name, unit="window", leave=False,
                                        dynamic_ncols=True, disable=None)  # no bars when not a terminal
        bar.n = done
        bar.refresh()
        if done == total:
            bars.pop(task.output).close()

    tic = time.perf_counter()
    written, failed, audio_s = 0, len(errors), 0.0
    sums = {"network": 0.0, "codec": 0.0, "other": 0.0}
    outcomes = upsample_files(up, tasks, fmt=args.format, overwrite=args.overwrite, progress=progress,
                              cutoff=args.cutoff, lfr=not args.no_lfr, steps=args.steps, solver=args.solver,
                              cfg_scale=args.cfg, seed=args.seed, rate=args.output_rate)
    for out in outcomes:
        if out.error is not None:
            failed += 1
            tqdm.write(f"error: {' '.join(out.error.split())}", file=sys.stderr)
            continue
        res, written = out.result, written + 1
        audio_s += res.duration
        for k in sums:
            sums[k] += getattr(res, f"{k}_s")
        rtf = res.rtf
        how = "detected" if args.cutoff == "auto" else "given"
        if res.cutoff >= 0.95 * SAMPLE_RATE / 2:
            how += "; the input is already full band, so there is little to add"
        tqdm.write(f"{out.task.input} -> {out.task.output}: {res.duration:.2f} s, {res.channels} ch, "
                   f"{res.sample_rate} Hz, "
                   f"cutoff {res.cutoff / 1000:.2f} kHz ({how}); RTF {rtf['total']:.3f} = network "
                   f"{rtf['network']:.3f} + codec {rtf['codec']:.3f} + other {rtf['other']:.3f}")
    wall = time.perf_counter() - tic
    line = f"done: {written} written, {failed} failed in {wall:.1f} s"
    if audio_s > 0:
        line += (f"; {audio_s:.1f} s of audio, RTF {wall / audio_s:.3f} "
                 f"(network {sums['network'] / audio_s:.3f}, codec {sums['codec'] / audio_s:.3f})")
    print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AudioError as exc:  # a failure outside any single file
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
