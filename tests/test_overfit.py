"""The overfit check, CPU-sized: a small model on the mdct codec memorises one clip."""

import pytest
import torch

from jat.config import Config
from jat.overfit import overfit_clip
from jat.synth import demo_clip


@pytest.mark.slow
def test_overfit_beats_sinc_baseline_by_wide_margin(tmp_path):
    cfg = Config.from_yaml("configs/demo.yaml", [
        f"train.output_dir={tmp_path}", "train.max_steps=250", "train.ckpt_every=250",
        "train.batch_size=4", "flow.steps=8"])
    hr = torch.from_numpy(demo_clip(2.0, 44100, seed=3))[None]  # [1, L]
    result = overfit_clip(cfg, hr, cutoff=8000.0)
    m = result.metrics
    assert m["lsd_ceiling"] < 0.05  # mdct reconstructs almost perfectly
    assert m["final_loss"] < m["first_loss"] / 20
    assert m["lsd_model"] < 0.4 * m["lsd_baseline"], m
    assert m["lsd_hf_model"] < 0.4 * m["lsd_hf_baseline"], m
    assert result.output.shape == hr.shape
