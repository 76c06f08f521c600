"""Pre-encode an audio folder into latent shards (HR + K degraded LR versions per segment).

    python scripts/precompute_latents.py --config demo.yaml --data audio/ --out latents/ \
        [--versions 4] [--shard-size 128] [--cache auto] [data.strict=true ...]

Resumable: rerun the same command after an interruption and only unfinished shards are encoded.
Over several processes: `accelerate launch [--multi_gpu --num_processes N ...] scripts/precompute_latents.py
...` splits the shards over the processes and merges at the end; or, with no launcher (separate jobs or
nodes sharing --out), run each with `--num-parts N --part-index i`, then once more without them to
merge (statistics, meta.json, index.json). The shards are the same bytes whatever the split.
--cache auto stores DAC's quantizer codes (int16) and mdct's latents in --dtype.
The logic lives in jat/data/precompute.py; the shard format is described in jat/data/datasets.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jat.codecs import CodecError, build_codec
from jat.config import Config, ConfigError, resolve_config_path
from jat.data.audio import AudioError, list_audio_files
from jat.data.precompute import CACHES, DTYPES, bytes_per_hour, cache_headers, precompute, resolve_cache


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
    p.add_argument("--cache", choices=CACHES, default="auto",
                   help="what shards store: codes (DAC: HR and LR as quantizer codes), codes-hr (HR codes, "
                        "LR latents), latents (--dtype); auto: codes where the codec has them")
    p.add_argument("--num-parts", type=int, default=1, help="split the shards into this many parts")
    p.add_argument("--part-index", type=int, default=0, help="the part this process encodes (0-based)")
    p.add_argument("--device", help="default: this process's accelerator, else cpu")
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
    if not 0 <= args.part_index < args.num_parts:
        print("error: need 0 <= --part-index < --num-parts", file=sys.stderr)
        return 2
    state = _launched(args.device)
    if state is not None and args.num_parts > 1:
        print("error: under accelerate launch the processes are the parts: drop --num-parts", file=sys.stderr)
        return 2
    part = (state.process_index, state.num_processes) if state is not None else (args.part_index,
                                                                                   args.num_parts)
    main_process = part[0] == 0
    device = args.device or (str(state.device) if state is not None else
                             "cuda" if torch.cuda.is_available() else "cpu")
    try:
        files = list_audio_files(data)
        codec = build_codec(cfg.codec).to(device).eval()
        cache = resolve_cache(args.cache, codec)
        if main_process:
            print(f"{len(files)} files -> {out}: {versions} LR versions per segment, "
                  f"{cfg.codec.name} codec on {device}, {cache} cache"
                  + (f", part {part[0]} of {part[1]}" if part[1] > 1 else ""))
        if state is not None:  # one process reads the headers; the others plan from its cache
            if main_process:
                cache_headers(files, out, cfg.data.strict)
            state.wait_for_everyone()
        kwargs = dict(versions=versions, shard_size=args.shard_size, seed=seed, batch_size=args.batch_size,
                      dtype=args.dtype, workers=args.workers, data_root=data if Path(data).is_dir() else
                      Path(data).parent, codec_config=cfg.to_dict()["codec"], cache=cache)
        planned = []
        with tqdm(unit="seg", desc="encoding", disable=not main_process) as bar, logging_redirect_tqdm():
            meta = precompute(files, out, codec, cfg.data, part=part, progress=bar.update,
                              on_plan=lambda n: (planned.append(n), setattr(bar, "total", n), bar.refresh()),
                              **kwargs)
        if part[1] > 1:
            print(f"part {part[0]} of {part[1]}: {planned[0]} segments done", flush=True)
        if state is not None:
            state.wait_for_everyone()
            if not main_process:
                return 0
            meta = precompute(files, out, codec, cfg.data, **kwargs)  # every shard is done: merges
    except (AudioError, CodecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if meta is None:
        print(f"part {part[0]} of {part[1]} done; once every part is, run again without --num-parts and "
              "--part-index to merge")
        return 0
    expected = bytes_per_hour(cache, versions, codec.latent_dim, getattr(codec, "n_codebooks", 0),
                              torch.finfo(DTYPES[args.dtype]).bits // 8, codec.frame_rate)
    print(f"cache: {meta['bytes'] / 1e6:.4g} MB for {meta['hours']:.4g} h of (mono) audio, "
          f"{meta['bytes_per_hour'] / 1e6:.4g} MB per hour (HR + {versions} LR versions; rows alone, "
          f"without padding and headers: {expected / 1e6:.4g} MB per hour)")
    print(f"wrote {len(meta['shards'])} shards, {meta['rows']} rows from {meta['files']} files to {out}")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} bad files:")
        for path, reason in meta["skipped"].items():
            print(f"  {path}: {reason}")
    return 0


def _launched(device: str | None):
    """accelerate's process state when this runs as one of several launched processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from jat.cli.launch import process_state

    return process_state(device)


if __name__ == "__main__":
    sys.exit(main())
