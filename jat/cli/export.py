"""Export an inference folder: EMA weights only (optionally bf16), the latent statistics, a model card.

    jat-export --checkpoint runs/real --out exported/real [--dtype bf16] [--adapter ADAPTER]

--checkpoint is a checkpoint folder, its weights.safetensors, or a run folder (its newest checkpoint).
The folder loads like any checkpoint (`jat-infer --checkpoint exported/real`,
`Upsampler.from_pretrained("exported/real")`) and can be pushed to the Hugging Face Hub as is
(`huggingface-cli upload ORG/NAME exported/real`), after which `--checkpoint hf://ORG/NAME` loads it.
"""

from __future__ import annotations

import argparse
import sys

from jat.checkpoint.export import DTYPES, export_inference
from jat.checkpoint.store import CheckpointError, resolve_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, weights file or run folder")
    ap.add_argument("--out", required=True, help="the inference folder to write")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--adapter", default=None, help="an adapter file to merge in first")
    ap.add_argument("--force", action="store_true", help="merge an adapter onto another base than its own")
    args = ap.parse_args(argv)
    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        record = export_inference(ckpt, args.out, dtype=args.dtype, adapter=args.adapter, force=args.force)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} (step {record['step']}) to {args.out}: weights {record['bytes'] / 2**20:.1f} MiB "
          f"against the checkpoint's {record['checkpoint_bytes'] / 2**20:.1f} MiB")
    return 0
