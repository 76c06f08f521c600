"""Trains the tiny model on a fixed in-memory latent dataset; run directly or under `accelerate launch`.

    python tests/train_worker.py OUT_DIR BATCH_SIZE MAX_STEPS [--resume auto] [--slow-save S] [key=value ...]

--slow-save S sleeps S seconds between the files of each checkpoint (fault-injection tests kill the
process while a checkpoint is being written).

Writes OUT_DIR/final-<rank>.safetensors (weights), OUT_DIR/seen-<rank>.json (example indices seen)
and OUT_DIR/losses-<rank>.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from helpers import C, FailingLatents, RandomLatents, make_config  # tests/ is this script's sys.path[0]
from safetensors.torch import save_file

from jat.codecs import LatentNorm
from jat.train.data import prepare
from jat.train.trainer import Trainer


def slow_down_saves(seconds: float) -> None:
    from jat.checkpoint import store as ckpt

    for name in ("write_main", "write_rng", "finish_save"):
        real = getattr(ckpt, name)

        def slow(*args, _real=real, **kwargs):
            time.sleep(seconds)
            return _real(*args, **kwargs)

        setattr(ckpt, name, slow)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("batch", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--slow-save", type=float, default=0.0)
    ap.add_argument("--fail-rank", type=int, default=None, help="this rank raises after a few examples")
    ap.add_argument("--float64", action="store_true", help="model, data and optimizer in float64")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = args.out
    if args.slow_save:
        slow_down_saves(args.slow_save)
    if args.float64:
        torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    data = RandomLatents()
    if args.fail_rank is not None and int(os.environ.get("RANK", "0")) == args.fail_rank:
        data = FailingLatents()
    extra = dict(o.split("=", 1) for o in args.overrides)
    cfg = make_config(out, args.batch, args.steps, **extra)
    trainer = Trainer(cfg, prepare(cfg, data, LatentNorm.identity(C)), resume=args.resume)
    trainer.fit()
    rank = trainer.acc.process_index
    model = trainer.acc.unwrap_model(trainer.model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/final-{rank}.safetensors")
    Path(f"{out}/seen-{rank}.json").write_text(json.dumps(data.seen))
    Path(f"{out}/losses-{rank}.json").write_text(json.dumps(trainer.history))


if __name__ == "__main__":
    main()
