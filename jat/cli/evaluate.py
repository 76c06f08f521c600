"""Evaluate a checkpoint: degrade each HR file at each cutoff (recorded protocol), upsample, score.

    python scripts/evaluate.py --checkpoint CKPT --data DIR [--cutoffs 4000 8000 12000] [--steps N]
        [--max-files N] [--max-seconds S] [--degradation lowpass|mp3-64|vorbis-q2|opus-32|noise-30|holes|...]
        [--json OUT]
    python scripts/evaluate.py --checkpoint CKPT --data speech=heldout-speech.txt music=heldout-music.txt

--data takes folders or manifests, each optionally named (NAME=PATH): named sets are also
aggregated per name. Reports LSD-HF, LSD-LF (with and without low-frequency replacement),
per-octave energy error and SI-SDR per file and in aggregate, beside the same metrics for the
sinc-resampled input and for the noise-fill baseline (jat/evaluation/baselines.py); prints a markdown table
and writes JSON and the table (OUT with .md).

    accelerate launch --num_processes N scripts/evaluate.py --checkpoint CKPT --data DIR --json OUT

spreads the files over N processes (process r scores files r, r + N, ...; with --device auto each on its
own device); the main process prints the table and writes the same JSON as one process would.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jat.checkpoint.store import CheckpointError, resolve_checkpoint
from jat.cli.launch import process_state
from jat.config import ConfigError
from jat.data.audio import AudioError, list_audio_files
from jat.data.degrade import eval_degradation
from jat.evaluation.evaluate import evaluate, markdown_table
from jat.infer.upsampler import Upsampler


def spread(files: list, n: int | None) -> list:
    """At most n of `files`, evenly spaced through the sorted list (a manifest sorted by folder, such
    as one voice or language per folder, is then sampled across its folders, not from the first)."""
    if n is None or len(files) <= n:
        return files
    return [files[i * len(files) // n] for i in range(n)]


def data_sets(specs: list[str], max_files: int | None = None) -> tuple[list[str], list[str] | None]:
    """--data entries ([NAME=]PATH) -> (files, one category per file, or None when none is named).

    An entry is NAME=PATH when it holds '=', is not itself an existing path and NAME has no '/'.
    max_files: at most this many files per entry (`spread`)."""
    named = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name and "/" not in name and not Path(spec).exists():
            named.append((name, path))
        else:
            named.append((None, spec))
    if any(name == "all" or "@" in (name or "") for name, _ in named):
        raise ValueError("a --data name may not be 'all' or contain '@' (aggregate names)")
    files, categories = [], []
    for name, path in named:
        found = spread(list_audio_files(path), max_files)
        files += found
        categories += [name or Path(path).stem] * len(found)
    return files, (categories if any(name for name, _ in named) else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a ckpt-* directory, its weights.safetensors, or a "
                    "run directory (its newest checkpoint)")
    ap.add_argument("--data", required=True, nargs="+", metavar="[NAME=]PATH",
                    help="folders (recursive) or manifests of HR audio, each optionally named")
    ap.add_argument("--cutoffs", nargs="+", type=float, default=[4000.0, 8000.0, 12000.0])
    ap.add_argument("--degradation", default="lowpass",
                    help="after the protocol's low-pass: lowpass (nothing more, the default), or '+'-joined "
                         "mp3-<kbps>, vorbis-q<0..10>, noise-<SNR dB>, holes (e.g. mp3-64, "
                         "mp3-128+noise-40); recorded in the JSON")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--envelope-aim", type=float, default=None,
                    help="a lognormal envelope's level: 0 typical .. 1 mean power (flow.sample_aim)")
    ap.add_argument("--max-seconds", type=float, default=None, help="score only the start of each file")
    ap.add_argument("--max-files", type=int, default=None, help="at most this many files per --data entry, "
                    "evenly spread through it")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="write results here (and a markdown table beside it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    state = process_state(args.device)  # one process, or one of `accelerate launch`'s
    device = str(state.device) if args.device == "auto" and state.num_processes > 1 else args.device
    try:
        up = Upsampler.from_checkpoint(resolve_checkpoint(args.checkpoint), device=device,
                                       adapter=args.adapter)
        if args.envelope_aim is not None:
            up.aim_envelope(args.envelope_aim)
        files, categories = data_sets(args.data, args.max_files)
        eval_degradation(args.degradation, 8000.0, 1.0)  # a bad spec is a usage error
    except (CheckpointError, ConfigError, AudioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = evaluate(up, files, args.cutoffs, steps=args.steps, seed=args.seed, max_seconds=args.max_seconds,
                      categories=categories, degradation=args.degradation, progress=print)
    code = 1 if result["skipped"] and not result["rows"] else 0
    if not state.is_main_process:
        return code
    table = markdown_table(result)
    print()
    print(table)
    for path, reason in result["skipped"].items():
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if args.json:
        out = Path(args.json)
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return code


if __name__ == "__main__":
    sys.exit(main())
