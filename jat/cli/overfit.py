"""Overfit check: memorise one clip, then upsample its LR version and score it.

    python scripts/overfit.py --config small.yaml --audio clip.wav --duration 6 --steps 600

Scores the output through the evaluation path (jat.evaluation.evaluate.score_clip) beside the sinc-resampled
LR input and the noise-fill baseline, reports LSD against the codec's own reconstruction of the
clip (the ceiling), and writes the audio, a spectrogram and metrics.json to --out.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jat.codecs.base import SAMPLE_RATE
from jat.config import Config, ConfigError, resolve_config_path
from jat.data.audio import AudioError, load_audio
from jat.train.overfit import format_metrics, overfit_clip, write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small.yaml")
    ap.add_argument("--audio", required=True,
                    help="audio file; the first --duration seconds are used (mono mix)")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--cutoff", type=float, default=8000.0, help="Hz, band limit of the LR version")
    ap.add_argument("--out", default="runs/overfit")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        overrides = [f"train.max_steps={args.steps}",
                     f"train.ckpt_every={args.steps}", f"train.output_dir={args.out}/train"] + args.overrides
        cfg = Config.from_yaml(resolve_config_path(args.config), overrides)
        hr = load_audio(args.audio, SAMPLE_RATE, mono=True)[:, : round(args.duration * SAMPLE_RATE)]  # [1, L]
    except (ConfigError, AudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = overfit_clip(cfg, hr, args.cutoff, seed=cfg.train.seed)
    files = write_report(result, args.out)
    print(format_metrics(result.metrics))
    print(f"wrote {', '.join(files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
