"""Pre-encode an audio folder into latent shards (HR + K degraded LR versions per segment).

    python scripts/precompute_latents.py --config demo.yaml --data audio/ --out latents/ \
        [--versions 4] [--shard-size 128] [data.strict=true ...]

Resumable: rerun the same command after an interruption and only unfinished shards are encoded.
The logic lives in jat/data/precompute.py; the shard format is described in jat/data/datasets.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jat.codecs import CodecError, build_codec
from jat.config import Config, ConfigError, resolve_config_path
from jat.data.audio import AudioError, list_audio_files
from jat.data.precompute import DTYPES, precompute


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (looked up in configs/ too)")
    p.add_argument("--data", help="audio folder or manifest (default: data.train)")
    p.add_argument("--out", help="output folder for shards (default: data.latents)")
    p.add_argument("--versions", type=int, help="degraded LR versions per segment (default: data.versions)")
    p.add_argument("--shard-size", type=int, default=128, help="segments per shard")
    p.add_argument("--batch-size", type=int, default=16, help="segments per codec call")
    p.add_argument("--seed", type=int, help="default: train.seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored latent dtype")
    p.add_argument("--workers", type=int, default=0, help="processes loading and degrading audio (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = Config.from_yaml(resolve_config_path(args.config), args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data, out = args.data or cfg.data.train, args.out or cfg.data.latents
    if not data or not out:
        print("error: give --data and --out (or set data.train and data.latents)", file=sys.stderr)
        return 2
    if (args.versions is not None and args.versions < 1) or min(args.shard_size, args.batch_size) < 1 \
            or args.workers < 0:
        print("error: need --versions, --shard-size, --batch-size >= 1 and --workers >= 0", file=sys.stderr)
        return 2
    seed = cfg.train.seed if args.seed is None else args.seed
    versions = args.versions or cfg.data.versions
    try:
        files = list_audio_files(data)
        codec = build_codec(cfg.codec).to(args.device).eval()
        print(f"{len(files)} files -> {out}: {versions} LR versions per segment, "
              f"{cfg.codec.name} codec on {args.device}")
        with tqdm(unit="seg", desc="encoding") as bar, logging_redirect_tqdm():
            meta = precompute(files, out, codec, cfg.data, versions=versions, shard_size=args.shard_size,
                              seed=seed, batch_size=args.batch_size, dtype=args.dtype, workers=args.workers,
                              data_root=data if Path(data).is_dir() else Path(data).parent,
                              codec_config=cfg.to_dict()["codec"], progress=bar.update,
                              on_plan=lambda n: (setattr(bar, "total", n), bar.refresh()))
    except (AudioError, CodecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(meta['shards'])} shards, {meta['rows']} rows from {meta['files']} files to {out}")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} bad files:")
        for path, reason in meta["skipped"].items():
            print(f"  {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
