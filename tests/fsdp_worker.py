"""Trains the tiny model on RandomLatents, sharded or not; run under `accelerate launch` (tests/test_fsdp.py).

    python tests/fsdp_worker.py OUT_DIR BATCH_SIZE MAX_STEPS [--until K] [--resume auto] [--float64]
                                [--val-clips N] [key=value ...]

--until K stops after step K as if interrupted there; --val-clips N validates every `train.val_every`
steps on N synthetic clips of 1 s. Writes OUT_DIR/report-<rank>.json: the losses, the seconds of each
step's training (validation and checkpoints excluded), the validation clips this process scored, and
how many of the parameter elements this process holds.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from helpers import C, RandomLatents, make_config  # tests/ is this script's sys.path[0]
from torch.distributed.tensor import DTensor

from jat.codecs import LatentNorm
from jat.codecs.base import SAMPLE_RATE
from jat.data.synth import demo_clip
from jat.train.data import prepare
from jat.train.trainer import Trainer
from jat.train.validation import Validator, make_clip


def clips(n: int) -> list:
    return [make_clip(f"c{i}", torch.from_numpy(demo_clip(1.0, SAMPLE_RATE, seed=i)).float()[None], 8000.0)
            for i in range(n)]


class TimedTrainer(Trainer):
    """Records the wall time between the end of one optimizer step's bookkeeping and the next."""

    def save(self, metric=None):
        tic = time.perf_counter()
        out = super().save(metric)
        self.excluded += time.perf_counter() - tic
        return out

    def validate(self):
        tic = time.perf_counter()
        out = super().validate()
        self.excluded += time.perf_counter() - tic
        return out


def local_elements(tensors) -> int:
    """How many elements this process holds (a DTensor's local shard, a plain tensor whole)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("batch", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--until", type=int, default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--float64", action="store_true", help="model, data and optimizer in float64")
    ap.add_argument("--val-clips", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    if args.float64:
        torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    cfg = make_config(args.out, args.batch, args.steps, **dict(o.split("=", 1) for o in args.overrides))
    validator = Validator(clips(args.val_clips), steps=2, log_media=False,
                          window_seconds=1.0) if args.val_clips else None
    trainer = TimedTrainer(cfg, prepare(cfg, RandomLatents(), LatentNorm.identity(C)), validator=validator,
                           resume=args.resume)
    trainer.excluded = 0.0
    first = trainer.step
    tic = time.perf_counter()
    trainer.fit(until=args.until)
    seconds = time.perf_counter() - tic - trainer.excluded
    report = {"losses": trainer.history, "seconds_per_step": seconds / max(1, trainer.step - first),
              "scored": validator.scored_here if validator else [], "sharded": trainer.sharded,
              "local_elements": local_elements(trainer.model_plain.parameters()),
              "ema_elements": local_elements(trainer.ema.shadow)}
    Path(f"{args.out}/report-{trainer.acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
