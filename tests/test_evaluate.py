"""scripts/evaluate.py and jat.evaluate: protocol, per-file and aggregate metrics beside the baseline."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from jat.evaluate import evaluate, markdown_table
from jat.synth import demo_clip

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sf.write(root / "a.wav", demo_clip(1.0, 44100, seed=1), 44100)
    sf.write(root / "b.flac", np.stack([demo_clip(1.0, 48000, seed=2)] * 2, 1), 48000)
    (root / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    return root


@dataclass
class _Result:
    audio: torch.Tensor
    rtf: dict


class Oracle:
    """Returns the true HR signal: the model figures must be perfect, the baseline's not."""

    def __init__(self, hr):
        self.hr = hr

    def upsample(self, lr, sr, **kw):
        return _Result(self.hr, {"total": 0.0})


def test_oracle_scores_zero_and_baseline_does_not(tmp_path):
    hr = torch.from_numpy(demo_clip(1.0, 44100, seed=5))[None]
    path = tmp_path / "x.wav"
    sf.write(path, hr[0].numpy(), 44100, subtype="FLOAT")
    result = evaluate(Oracle(hr), [path], [4000, 8000])
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["lsd_model"] == pytest.approx(0.0, abs=1e-6)
        assert row["lsd_hf_model"] == pytest.approx(0.0, abs=1e-6)
        assert row["lsd_hf_baseline"] > 1.0 and row["si_sdr_model"] > 60
    # a lower cutoff removes more: the baseline gets worse
    by_cut = {r["cutoff"]: r for r in result["rows"]}
    assert by_cut[4000.0]["lsd_baseline"] > by_cut[8000.0]["lsd_baseline"]
    agg = result["aggregate"]
    assert agg["all"]["n"] == 2
    assert agg["all"]["lsd_baseline"] == pytest.approx(np.mean([r["lsd_baseline"] for r in result["rows"]]))
    assert result["protocol"]["filter"] == "butter" and result["protocol"]["cutoffs"] == [4000.0, 8000.0]


def test_script_writes_json_and_table_and_lists_bad_files(tmp_path, data):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    args = ["scripts/evaluate.py", "--checkpoint", str(ckpt), "--data", str(data), "--cutoffs", "4000",
            "8000",
            "--steps", "2", "--json", str(out), "--device", "cpu"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 4  # 2 good files x 2 cutoffs (b.flac: both channels in one row)
    assert list(result["skipped"]) == [str(data / "broken.wav")]
    assert "broken.wav" in proc.stderr
    for row in result["rows"]:
        # low-frequency replacement keeps the input below the cutoff: LF matches the baseline's
        assert row["lsd_lf_model"] == pytest.approx(row["lsd_lf_baseline"], abs=0.35)
        assert np.isfinite([row[k] for k in row if k.startswith(("lsd", "si_sdr"))]).all()
    table = out.with_suffix(".md").read_text()
    assert table == markdown_table(result) + "\n"
    assert {line.split("|")[1].strip() for line in table.splitlines()[2:]} == {"all", "4000", "8000"}
