"""Experiment trackers through accelerate (jat/train/tracking.py): train.log_with, the TensorBoard default
and its tags, any GeneralTracker receiving the same scalars, and trackers rejected before any work."""

import importlib.util

import pytest
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker
from helpers import C, RandomLatents, make_config, tiny_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jat.codecs import LatentNorm
from jat.config import ConfigError
from jat.train.data import prepare
from jat.train.tracking import hyperparameters
from jat.train.trainer import Trainer

# the trainer's scalar tags before trackers went through accelerate (3 steps, log_every=1, no validation)
TAGS = {"train/loss", "train/grad_norm", "train/lr", "train/examples_per_s", "train/tokens_per_s",
        "train/skipped_steps"}


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's event files in `folder` (not its sub-folders) -> {tag: [(step, value)]}."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class ListTracker(GeneralTracker):
    """A tracker that keeps what it is given, as any accelerate tracker would receive it."""

    name = "list"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict):
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_default_writes_tensorboard_scalars_under_the_same_tags(tmp_path):
    """train.log_with defaults to [tensorboard]: OUT/logs holds the scalars, train/loss at each step is
    the step's loss (TensorBoard stores float32: relative rounding 2^-24, checked at 1e-6)."""
    trainer = tiny_trainer(tmp_path, steps=3)
    assert trainer.cfg.train.log_with == ["tensorboard"]
    trainer.fit()
    got = scalars(tmp_path / "logs")
    assert TAGS <= set(got)
    # and the loss per quarter of t, whose names already hold a group (loss_t/0.25)
    assert {tag for tag in set(got) - TAGS if not tag.startswith("loss_t/")} == set()
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3]
    assert [v for _, v in got["train/loss"]] == pytest.approx(trainer.history, rel=1e-6)
    assert [v for _, v in got["train/skipped_steps"]] == [0, 0, 0]


def test_resume_logs_into_the_same_folder(tmp_path):
    """A resumed run adds to OUT/logs (one more event file there), its steps continuing the first run's."""
    tiny_trainer(tmp_path, steps=6).fit(until=3)
    tiny_trainer(tmp_path, steps=6, resume="auto").fit()
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 2
    assert [step for step, _ in scalars(tmp_path / "logs")["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_any_accelerate_tracker_receives_the_same_scalars(tmp_path):
    """An Accelerator passed in brings its trackers: a custom GeneralTracker beside TensorBoard gets the
    flat config once, every scalar TensorBoard got (same tags, steps and values) and is finished."""
    cfg = make_config(str(tmp_path), 2, 3)
    if PartialState().num_processes == 1:  # as make_accelerator does: another test may have set bf16
        AcceleratorState._reset_state()
    fake = ListTracker()
    acc = Accelerator(mixed_precision="no", log_with=["tensorboard", fake], project_dir=str(tmp_path))
    Trainer(cfg, prepare(cfg, RandomLatents(), LatentNorm.identity(C)), accelerator=acc).fit()
    assert fake.config == hyperparameters(cfg) and fake.config["train.batch_size"] == 2
    assert fake.finished
    received: dict[str, list[tuple[int, float]]] = {}
    for step, values in fake.logged:
        for tag, v in values.items():
            received.setdefault(tag, []).append((step, v))
    tensorboard = scalars(tmp_path / "logs")
    assert set(received) == set(tensorboard)
    for tag, series in received.items():
        assert [s for s, _ in series] == [s for s, _ in tensorboard[tag]], tag
        assert [v for _, v in series] == pytest.approx([v for _, v in tensorboard[tag]], rel=1e-6), tag


def test_hyperparameters_are_flat_scalars(tmp_path):
    flat = hyperparameters(make_config(str(tmp_path), 2, 3))
    assert flat["train.log_with"] == "['tensorboard']" and flat["train.init_from"] == "None"
    assert flat["train.max_steps"] == 3 and flat["optim.lr"] == 1e-3
    assert all(type(v) in (bool, int, float, str) for v in flat.values())


def test_unknown_tracker_is_rejected_with_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.log_with: unknown trackers \['tensorbord'\]; accelerate "
                                          r"offers .*tensorboard.*wandb"):
        make_config(str(tmp_path), 2, 3, **{"train.log_with": "[tensorbord]"})
    with pytest.raises(ConfigError, match="train.log_with: a tracker named twice"):
        make_config(str(tmp_path), 2, 3, **{"train.log_with": "[tensorboard, tensorboard]"})


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_missing_tracker_fails_before_any_work(tmp_path):
    """wandb is a tracker accelerate drives, but not installed: ConfigError naming the setting and the
    package, before the output folder is created or locked."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"train\.log_with: tracker 'wandb' is not installed "
                                          r"\(pip install wandb\)"):
        tiny_trainer(out, steps=3, **{"train.log_with": "[tensorboard, wandb]"})
    assert not out.exists()


def test_wandb_run_id_is_made_once_and_read_back_on_resume(tmp_path):
    """A resumed run continues its W&B run: the id is written once in the logs folder, then read back."""
    from jat.train.tracking import _wandb_id

    first = _wandb_id(tmp_path / "logs")
    assert len(first) == 16 and int(first, 16) >= 0  # 8 random bytes in hex
    assert (tmp_path / "logs" / "wandb-id").read_text().strip() == first
    assert _wandb_id(tmp_path / "logs") == first
    assert _wandb_id(tmp_path / "other" / "logs") != first  # another output folder, another run
