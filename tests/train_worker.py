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
from safetensors.torch import save_file
from torch.utils.data import Dataset

from jat.codecs import LatentNorm
from jat.config import Config
from jat.train.data import prepare
from jat.train.trainer import Trainer

C, T = 512, 24


class RandomLatents(Dataset):
    """Fixed random (x, c) pairs; records which indices this process asked for."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, C, T, generator=g)
        self.c = self.x + 0.5 * torch.randn(n, C, T, generator=g)
        self.seen: list[int] = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return {"x": self.x[i], "c": self.c[i], "mask": torch.ones(T, dtype=torch.bool)}


class FailingLatents(RandomLatents):
    """Raises on its fifth example, as a corrupt file or a bug in one process would."""

    def __getitem__(self, i):
        if len(self.seen) >= 4:
            raise RuntimeError(f"injected failure on rank {os.environ.get('RANK')}")
        return super().__getitem__(i)


def make_config(out: str, batch: int, steps: int, **extra) -> Config:
    cfg = Config.from_yaml(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", [
        f"train.output_dir={out}", f"train.batch_size={batch}", f"train.max_steps={steps}",
        "train.ckpt_every=3", "train.log_every=1", "train.keep_last=2", "train.mixed_precision=no",
        "optim.warmup_steps=2", "optim.lr=1e-3", "train.ema_decay=0.9",
        *[f"{k}={v}" for k, v in extra.items()]])
    return cfg


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
