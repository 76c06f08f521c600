"""Re-fit a checkpoint's envelope head alone with another envelope target (jat/train/envelope.py).

    jat-fit-envelope --checkpoint CKPT --latents data/corpus/latents-mdct --out DIR \
        [--target log] [--steps 1500] [--batch-size 16] [--lr 1e-3] [--seed 0] \
        [--hidden 128] [--dilations 1 2 4 8] [--aligned 8]

The DiT is left as it is; DIR/weights.safetensors loads like any trained checkpoint, with
flow.envelope_target set to --target.
"""

from __future__ import annotations

import argparse
import sys

from jat.checkpoint.store import CheckpointError
from jat.data.datasets import ShardError
from jat.train.envelope import fit_envelope


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--latents", required=True, help="pre-encoded pairs (scripts/precompute_latents.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", choices=("power", "log", "lognormal"), default="log")
    ap.add_argument("--aim", type=float, default=None,
                    help="lognormal: flow.envelope_aim, 0 the typical level .. 1 the mean power "
                         "(default: the config's)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=None,
                    help="a new head of this width (model.envelope_hidden) instead of the trained one")
    ap.add_argument("--dilations", type=int, nargs="+", default=None,
                    help="a new head with these temporal dilations (model.envelope_dilations)")
    ap.add_argument("--aligned", type=int, default=None,
                    help="a new head that also sees this many bands below the band edge "
                         "(model.envelope_aligned)")
    args = ap.parse_args(argv)
    try:
        out = fit_envelope(args.checkpoint, args.latents, args.out, target=args.target, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           hidden=args.hidden, dilations=args.dilations, aligned=args.aligned, aim=args.aim,
                           progress=lambda s, loss: print(f"step {s}: envelope loss {loss:.4f}", flush=True))
    except (CheckpointError, ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {out / 'weights.safetensors'}")
    return 0

