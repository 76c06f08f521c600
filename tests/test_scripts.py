"""End-to-end runs of the scripts as a user runs them."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT

from jat.data.synth import demo_clip


def run(*args, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    for i, (sr, seconds) in enumerate([(44100, 1.5), (48000, 1.0), (22050, 0.5)]):
        x = demo_clip(seconds, sr, seed=i)
        sf.write(root / f"clip{i}.wav", np.stack([x, 0.5 * x], 1) if i == 1 else x, sr)
    return root


@pytest.mark.slow
def test_train_script_on_audio_folder_then_resume(tmp_path, audio_dir):
    out = tmp_path / "run"
    common = ["scripts/train.py", "--config", "tiny.yaml", f"data.train={audio_dir}", f"data.val={audio_dir}",
              "data.segment_seconds=1.0", "data.val_clips=1", f"train.output_dir={out}", "train.batch_size=2",
              "train.ckpt_every=2", "train.val_every=4", "train.val_steps=2", "train.log_every=1"]
    proc = run(*common, "train.max_steps=4")
    assert "done: step 4" in proc.stdout
    state = json.loads((out / "ckpt-00000004" / "state.json").read_text())
    assert state["step"] == 4
    metric = state["metric"]  # the validation of step 4 (val_every=4): the model beside the sinc input
    assert {"lsd", "lsd_hf", "lsd_lf", "lsd_lf_no_lfr", "lsd_baseline", "lsd_hf_fill"} <= set(metric)
    assert all(math.isfinite(v) for v in metric.values())
    assert metric["lsd_hf_sinc"] > 5 * metric["lsd_lf_sinc"]  # the input lacks the band above the cutoff
    assert state["best"] == {"lsd": metric["lsd"], "name": "ckpt-00000004", "step": 4}  # the one validated
    assert list((out / "logs").glob("events.out.tfevents.*"))
    proc = run(*common, "train.max_steps=6", "--resume", "auto")
    assert "done: step 6" in proc.stdout
    assert (out / "ckpt-00000006" / "weights.safetensors").is_file()


def test_train_script_rejects_bad_config_before_work(tmp_path):
    proc = run("scripts/train.py", "--config", "tiny.yaml", "train.bach_size=3", check=False)
    assert proc.returncode == 2
    assert "train.bach_size: unknown key (did you mean 'batch_size'?)" in proc.stderr
    assert "tiny.yaml" in proc.stderr
    proc = run("scripts/train.py", "--config", "tiny.yaml", f"data.train={tmp_path}/missing", check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr


@pytest.mark.parametrize("rate,in_sr,expect_sr", [("48000", 22050, 48000), ("input", 96000, 96000),
                                                  ("input", 22050, 44100)])
def test_infer_script_writes_the_output_rate_and_exact_length(tmp_path, rate, in_sr, expect_sr):
    """scripts/infer.py --output-rate on a tiny checkpoint: the written file is at the asked rate (for
    `input`: the input's where it is above 44.1 kHz, else 44.1 kHz) with exactly ceil(L * R / sr)
    samples, the input's duration, for an input length that is no whole number of output samples."""
    from helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    n = round(0.7 * in_sr) + 3
    x = demo_clip(1.0, in_sr, seed=4)[:n]
    sf.write(tmp_path / "in.wav", np.stack([x, 0.5 * x], 1), in_sr)
    run("scripts/infer.py", str(tmp_path / "in.wav"), "--checkpoint", str(ckpt), "--output-dir",
        str(tmp_path / "out"), "--steps", "1", "--output-rate", rate, "--device", "cpu", "-q")
    info = sf.info(str(tmp_path / "out" / "in_jat.wav"))
    assert (info.samplerate, info.channels) == (expect_sr, 2)
    assert info.frames == -(-n * expect_sr // in_sr)
