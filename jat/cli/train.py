"""Train JaT-AudioSR.

    accelerate launch scripts/train.py --config configs/v2.yaml [section.key=value ...] [--resume auto]
    python scripts/train.py --config small.yaml data.train=my_audio/ train.max_steps=2000

A bare name such as `v2.yaml` resolves to configs/v2.yaml. `--resume auto` continues from the
newest complete checkpoint in train.output_dir (or starts fresh when there is none).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jat.checkpoint.store import CheckpointError
from jat.cli.launch import process_state
from jat.codecs import CodecError
from jat.config import Config, ConfigError, resolve_config_path
from jat.data.audio import AudioError
from jat.data.datasets import ShardError
from jat.train import tracking
from jat.train.data import prepare
from jat.train.trainer import Trainer, TrainingError
from jat.train.validation import Validator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file, or a name in configs/")
    ap.add_argument("--resume", default=None,
                    help="'auto' (newest checkpoint in output_dir) or a checkpoint dir")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = Config.from_yaml(resolve_config_path(args.config), args.overrides)
        tracking.require_installed(cfg.train.log_with)  # a missing tracker package fails before any work
        data = prepare(cfg, device=process_state().device)  # the dataset in its latent space
        trainer = Trainer(cfg, data, validator=Validator.from_config(cfg), resume=args.resume)
        metrics = trainer.fit()
    except (ConfigError, AudioError, ShardError, CodecError, CheckpointError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.acc.is_main_process:
        print("done: step {}, {}".format(trainer.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
