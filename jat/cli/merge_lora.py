"""Merge a LoRA / QLoRA adapter into its base model: a full-precision checkpoint for export.

    python scripts/merge_lora.py --checkpoint BASE_CKPT --adapter ADAPTER --out DIR
    python scripts/merge_lora.py --checkpoint runs/qlora/ckpt-00020000 --out DIR

ADAPTER is an adapter file (adapter.safetensors) or a LoRA training checkpoint. A LoRA training
checkpoint given alone as --checkpoint merges onto its own base (its config's train.init_from).
4-bit base weights are dequantized, (alpha / r) B A is added, and DIR/weights.safetensors loads
like any trained checkpoint (scripts/infer.py --checkpoint DIR).

An adapter is refused on another base than the one it was trained on (it records the base's
identity); --force merges it anyway.
"""

from __future__ import annotations

import argparse
import sys

from jat.checkpoint.load import merge_checkpoint
from jat.checkpoint.store import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="base checkpoint, or a LoRA training checkpoint")
    ap.add_argument("--adapter", default=None, help="adapter file or LoRA training checkpoint")
    ap.add_argument("--out", required=True, help="output directory of the merged checkpoint")
    ap.add_argument("--force", action="store_true",
                    help="merge even onto another base than the one the adapter was trained on")
    args = ap.parse_args(argv)
    try:
        out = merge_checkpoint(args.checkpoint, args.out, args.adapter, force=args.force)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged checkpoint: {out / 'weights.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
