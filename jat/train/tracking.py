"""Experiment trackers through accelerate: `train.log_with` names them (TensorBoard by default).

The trainer builds its Accelerator with `log_with=train.log_with` and `project_dir=train.output_dir`, opens
the trackers with `open_trackers` on the main process (run name `RUN`, so TensorBoard writes
OUTPUT_DIR/logs as it always has; the config goes in as flat hyper-parameters) and logs its scalars with
`Accelerator.log`, so every tracker accelerate drives receives the same figures under the same tags. The
TensorBoard tracker's SummaryWriter also takes validation's audio and spectrogram images; with another
tracker alone there is no media. A resumed run logs into the same place: the same OUTPUT_DIR/logs folder
(TensorBoard adds an event file there, steps continue from the checkpoint), and for W&B the same run,
whose id is kept in OUTPUT_DIR/logs/wandb-id.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers

from jat.atomic import write_atomic
from jat.config import Config, ConfigError

log = logging.getLogger(__name__)

RUN = "logs"  # the run (project) name trackers get; TensorBoard's folder under the output folder
PIP_NAMES = {"comet_ml": "comet-ml"}  # where the package to install is not named like its tracker


def require_installed(names: list[str]) -> None:
    """Raise ConfigError naming `train.log_with` and the package to install for the first tracker in
    `names` whose package is missing (accelerate would drop it silently)."""
    available = {str(t) for t in get_available_trackers()}
    for name in names:  # known names: the config's rules checked them
        if name not in available:
            raise ConfigError(f"train.log_with: tracker '{name}' is not installed "
                              f"(pip install {PIP_NAMES.get(name, name)})")


def hyperparameters(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config as one flat dict of scalars ('train.batch_size': 16): what every tracker accepts;
    lists and None are written as text."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value if isinstance(value, bool | int | float | str) else str(value)

    walk("", cfg.to_dict())
    return flat


def _wandb_id(folder: Path) -> str:
    """This output folder's W&B run id: made once, then read back, so a resumed run continues it."""
    path = folder / "wandb-id"
    if not path.exists():  # written whole or not at all, like every file a run keeps
        write_atomic(path, lambda tmp: tmp.write_text(secrets.token_hex(8) + "\n"))
    return path.read_text().strip()


def open_trackers(acc: Accelerator, cfg: Config):
    """Start the Accelerator's trackers (main process); returns TensorBoard's SummaryWriter, for media,
    or None when TensorBoard is not among them."""
    out = Path(cfg.train.output_dir)
    kwargs = {}
    if "wandb" in {str(t) for t in acc.log_with}:
        kwargs["wandb"] = {"id": _wandb_id(out / RUN), "resume": "allow", "dir": str(out), "name": out.name}
    acc.init_trackers(RUN, config=hyperparameters(cfg), init_kwargs=kwargs)
    names = [t.name for t in acc.trackers]
    log.info("trackers: %s", ", ".join(names) or "none")
    return acc.get_tracker("tensorboard", unwrap=True) if "tensorboard" in names else None


def close_trackers(acc: Accelerator) -> None:
    """Finish every started tracker (flush and close) and forget them; not a collective, unlike
    `Accelerator.end_training`, so it is safe on a path where other processes raised."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()
