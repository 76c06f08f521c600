"""The one scoring path (score_clip) and its users: evaluation, validation, scripts/evaluate.py."""

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import CHILD_ENV, DDP_ENV, ROOT, make_checkpoint

from jat.cli import evaluate as evaluate_script
from jat.codecs.base import SAMPLE_RATE
from jat.data.degrade import EVAL_FILTER, Degradation, apply_degradation
from jat.data.synth import demo_clip
from jat.evaluation.baselines import noise_fill
from jat.evaluation.evaluate import METRICS, evaluate, markdown_table, score_clip
from jat.evaluation.metrics import evaluate_pair, lsd_split
from jat.infer.upsampler import Upsampler
from jat.train.validation import Validator, make_clip

SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sf.write(root / "a.wav", demo_clip(1.0, 44100, seed=1), 44100)
    sf.write(root / "b.flac", np.stack([demo_clip(1.0, 48000, seed=2)] * 2, 1), 48000)
    (root / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    return root


def degraded(seconds: float, cutoff: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    hr = torch.from_numpy(demo_clip(seconds, SR, seed=seed)).float()[None]  # [1, L]
    return hr, apply_degradation(hr, SR, Degradation(cutoff, *EVAL_FILTER))


# --- score_clip against the shipped path ---------------------------------------------------------------


def test_score_clip_is_the_shipped_path(checkpoint):
    """Several windows (0.5 s each over 1.5 s): the with-LFR output and its figures are exactly those of
    up.upsample(..., lfr=True); the no-LFR figure scores the same output before the replacement."""
    up = Upsampler.from_checkpoint(checkpoint, device="cpu", precision="fp32", window_seconds=0.5,
                                   overlap_seconds=0.2)
    hr, lr = degraded(1.5, 6000.0, seed=4)
    score = score_clip(up, hr, lr, 6000.0, steps=2, seed=3)
    shipped = up.upsample(lr, SR, cutoff=6000.0, lfr=True, steps=2, seed=3).audio  # [1, L]
    raw = up.upsample(lr, SR, cutoff=6000.0, lfr=False, steps=2, seed=3).audio  # [1, L]
    assert score.output.shape == hr.shape
    assert torch.allclose(score.output, shipped, rtol=0, atol=1e-6)
    assert torch.equal(score.raw, raw)
    direct = evaluate_pair(shipped, hr, lr, 6000.0, SR, seed=3)
    for key, value in direct.items():
        assert score.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert score.metrics["lsd_lf_no_lfr"] == pytest.approx(lsd_split(raw, hr, 6000.0, SR)["lsd_lf"])
    # a random tiny network does not keep the band it was given; the replacement does
    assert score.metrics["lsd_lf_no_lfr"] > score.metrics["lsd_lf_model"] + 0.2
    assert score.metrics["lsd_lf_model"] == pytest.approx(score.metrics["lsd_lf_sinc"], abs=0.35)
    assert torch.equal(score.fill, noise_fill(lr, 6000.0, SR, seed=3))
    assert score.octaves["model"].mean_abs == pytest.approx(score.metrics["octave_err_model"])
    assert set(score.metrics) == set(METRICS)


def test_rtf_is_the_upsampling_time_over_the_clip_duration(checkpoint):
    """rtf: the time to upsample (network, codec, replacement), per second of audio. The network is
    slowed by a known sleep per call: rtf x duration lies between the time slept and the whole call."""
    up = Upsampler.from_checkpoint(checkpoint, device="cpu", precision="fp32", window_seconds=0.5,
                                   overlap_seconds=0.2)
    hr, lr = degraded(1.5, 6000.0, seed=4)
    slept, forward = [], up.model.forward

    def slow_forward(*args, **kwargs):  # a slow network
        time.sleep(0.05)
        slept.append(0.05)
        return forward(*args, **kwargs)

    up.model.forward = slow_forward
    tic = time.perf_counter()
    score = score_clip(up, hr, lr, 6000.0, steps=2, seed=3)
    wall = time.perf_counter() - tic
    duration = hr.shape[-1] / SR
    assert len(slept) >= 3  # several windows and steps: the sleeps add up to something measurable
    assert sum(slept) <= score.metrics["rtf"] * duration <= wall


def test_validator_reports_score_clip_figures(checkpoint):
    up = Upsampler.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    clips = [make_clip(f"c{i}", degraded(1.0, 8000.0, seed=i)[0], 8000.0) for i in range(2)]
    logged = {}  # tag -> (value, step, keyword arguments), as a SummaryWriter stores them
    log = lambda tag, value, step, **kw: logged.update({tag: (value, step, kw)})  # noqa: E731
    writer = SimpleNamespace(add_audio=log, add_image=log)
    validator = Validator(clips, steps=2, seed=5, window_seconds=up.cfg.data.segment_seconds)
    got = validator(up.model, up.latents, up.flow, writer, step=7)
    same = Upsampler(up.model, up.latents, up.flow, "cpu", window_seconds=up.cfg.data.segment_seconds)
    scores = [score_clip(same, c.hr, c.lr, c.cutoff, steps=2, seed=5 + i) for i, c in enumerate(clips)]
    for key in scores[0].metrics:
        if key == "rtf":
            continue
        want = float(np.mean([s.metrics[key] for s in scores]))
        assert got[key.removesuffix("_model")] == pytest.approx(want, rel=1e-6), key
    assert got["lsd"] == pytest.approx(np.mean([s.metrics["lsd_model"] for s in scores]), rel=1e-6)
    assert got["lsd_baseline"] == got["lsd_sinc"]
    for key in ("lsd", "lsd_hf", "lsd_lf", "lsd_lf_no_lfr", "octave_err", "si_sdr", "lsd_hf_fill",
                "octave_err_fill", "lsd_hf_sinc"):
        assert isinstance(got[key], float), key
    assert torch.equal(validator.last_outputs[0], scores[0].output)
    kinds = ("lr", "noise_fill", "output", "hr")
    assert set(logged) == {f"val_{m}/c{i}/{k}" for m in ("audio", "spec") for i in (0, 1) for k in kinds}
    assert all(step == 7 for _, step, _ in logged.values())
    for i, (clip, score) in enumerate(zip(clips, scores, strict=True)):  # what was heard is what was scored
        for kind, audio in (("output", score.output), ("noise_fill", score.fill), ("hr", clip.hr)):
            value, _, kw = logged[f"val_audio/c{i}/{kind}"]
            assert kw["sample_rate"] == SR and torch.equal(value, audio.reshape(-1).clamp(-1, 1)), kind
        image, _, kw = logged[f"val_spec/c{i}/output"]
        assert image.shape[::2] == (1025, 3) and kw == {"dataformats": "HWC"}  # an RGB image, 1025 bins high


# --- evaluate() with an oracle ---------------------------------------------------------------------------


@dataclass
class _Result:
    audio: torch.Tensor
    input: torch.Tensor


class Oracle:
    """Returns the true HR signal (asked without LFR, as score_clip must)."""

    def __init__(self, hr):
        self.hr = hr

    def upsample(self, lr, sr, **kw):
        assert kw["lfr"] is False and sr == SR
        return _Result(self.hr.clone(), lr)


def test_oracle_scores_near_zero_and_baselines_do_not(tmp_path):
    hr = torch.from_numpy(demo_clip(1.0, 44100, seed=5))[None]
    for name in ("x", "y"):
        sf.write(tmp_path / f"{name}.wav", hr[0].numpy(), 44100, subtype="FLOAT")
    files = [tmp_path / "x.wav", tmp_path / "y.wav"]
    result = evaluate(Oracle(hr), files, [4000, 8000], categories=["speech", "music"])
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["lsd_lf_no_lfr"] == pytest.approx(0.0, abs=1e-6)  # the oracle itself is perfect
        assert row["lsd_hf_model"] < 0.05 and row["octave_err_model"] < 0.05  # LFR leaves the top alone
        # below the cutoff LFR takes the input's band, crossfaded into the oracle's from 0.9 cutoff up
        assert 1e-3 < row["lsd_lf_model"] < row["lsd_lf_sinc"]
        assert row["lsd_hf_sinc"] > 1.0 and row["octave_err_sinc"] > 20
        assert row["lsd_hf_fill"] < row["lsd_hf_sinc"] and row["octave_err_fill"] < row["octave_err_sinc"]
        bands = 3 if row["cutoff"] == 4000 else 2  # [4k, 8k), [8k, 16k), [16k, 22.05k] / from 8k
        assert len(row["octaves"]["bands"]) == len(row["octaves"]["fill"]) == bands
    by_cut = {r["cutoff"]: r for r in result["rows"]}
    assert by_cut[4000.0]["lsd_sinc"] > by_cut[8000.0]["lsd_sinc"]  # a lower cutoff removes more
    agg = result["aggregate"]
    assert set(agg) == {"all", "4000", "8000", "speech", "music", "speech@4000", "speech@8000",
                        "music@4000", "music@8000"}
    assert agg["all"]["n"] == 4 and agg["speech"]["n"] == 2 and agg["music@8000"]["n"] == 1
    assert agg["all"]["lsd_sinc"] == pytest.approx(np.mean([r["lsd_sinc"] for r in result["rows"]]))
    assert agg["speech@4000"]["lsd_hf_fill"] == by_cut[4000.0]["lsd_hf_fill"]
    assert result["protocol"]["filter"] == "butter" and result["protocol"]["cutoffs"] == [4000.0, 8000.0]
    medians = result["octave_medians"]  # octaves line up within one cutoff only
    assert set(medians) == {"4000", "8000", "speech@4000", "speech@8000", "music@4000", "music@8000"}
    assert medians["4000"]["n"] == 2 and len(medians["4000"]["model"]) == 3
    assert len(medians["8000"]["fill"]) == 2
    assert np.abs(medians["8000"]["model"]).max() < 0.05  # the oracle's energy is right in every octave
    rows4k = [r for r in result["rows"] if r["cutoff"] == 4000]
    assert medians["4000"]["fill"] == pytest.approx(np.median([r["octaves"]["fill"] for r in rows4k], axis=0))
    table = markdown_table(result).splitlines()
    assert table[0] == "| group | n | metric | model | sinc | noise fill |"
    assert len(table) == 2 + 5 * len(agg) + 5 + len(medians)
    assert table[2 + 5 * len(agg) + 5].startswith("| 4000 | 2 | ")
    assert table[-1].startswith("| music@8000 | 1 |") and table[-1].endswith("| 2 of 2 |")
    lf = next(line for line in table if line.startswith("| speech@8000 | 1 | LSD-LF (no LFR) |"))
    assert float(lf.split("|")[4]) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="categories"):
        evaluate(Oracle(hr), files, [8000], categories=["speech"])


def test_data_sets_names_and_plain_paths(data, tmp_path):
    files, cats = evaluate_script.data_sets([str(data)])
    assert cats is None and [f.name for f in files] == ["a.wav", "b.flac", "broken.wav"]
    files, cats = evaluate_script.data_sets([f"speech={data / 'a.wav'}", f"music={data}"])
    assert cats == ["speech", "music", "music", "music"] and len(files) == 4
    odd = tmp_path / "x=y.wav"
    sf.write(odd, demo_clip(0.2, 44100, seed=0), 44100)
    assert evaluate_script.data_sets([str(odd)]) == ([odd], None)  # an existing path is a path
    with pytest.raises(ValueError, match="all"):
        evaluate_script.data_sets([f"all={data}"])


def test_script_writes_json_and_table_and_lists_bad_files(tmp_path, data, checkpoint):
    out = tmp_path / "eval.json"
    args = ["scripts/evaluate.py", "--checkpoint", str(checkpoint), "--data", str(data), "--cutoffs", "4000",
            "8000", "--steps", "2", "--json", str(out), "--device", "cpu"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 4  # 2 good files x 2 cutoffs (b.flac: both channels in one row)
    assert list(result["skipped"]) == [str(data / "broken.wav")]
    assert "broken.wav" in proc.stderr
    for row in result["rows"]:
        # low-frequency replacement keeps the input below the cutoff: LF matches the sinc input's
        assert row["lsd_lf_model"] == pytest.approx(row["lsd_lf_sinc"], abs=0.35)
        assert np.isfinite([row[k] for k in METRICS]).all()
    table = out.with_suffix(".md").read_text()
    assert table == markdown_table(result) + "\n"
    assert table in proc.stdout
    metric_lines = table.split("\n\n")[0].splitlines()[2:]
    assert {line.split("|")[1].strip() for line in metric_lines} == {"all", "4000", "8000"}
    assert "| 8000 | 2 | " in table  # and the per-octave medians of each cutoff


def test_max_files_spreads_evenly_through_each_entry():
    files = [f"{lang}/{i}.wav" for lang in ("ca", "de", "en", "fr") for i in range(5)]  # sorted by folder
    picked = evaluate_script.spread(files, 4)
    assert picked == ["ca/0.wav", "de/0.wav", "en/0.wav", "fr/0.wav"]  # one per folder, not the first 4
    assert evaluate_script.spread(files, 50) == files and evaluate_script.spread(files, None) == files


def test_script_with_a_codec_degradation_records_it_and_codes_the_input(tmp_path, data, checkpoint):
    """--degradation mp3-64 end to end: the protocol names it, each row records the low-pass followed by
    the codec, and the LR really went through LAME: the sinc baseline (the LR itself) differs from the
    plain low-pass's inside the band. At a 12 kHz cutoff LAME's own 16.7 kHz low-pass is above the band,
    so only its quantisation noise can make that difference."""
    out = tmp_path / "mp3.json"
    args = ["scripts/evaluate.py", "--checkpoint", str(checkpoint), "--data", str(data / "a.wav"),
            "--cutoffs", "12000", "--steps", "1", "--degradation", "mp3-64", "--json", str(out),
            "--device", "cpu"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["protocol"]["degradation"] == "mp3-64"
    (row,) = result["rows"]
    assert Degradation.from_record(row["degradation"]) == Degradation(12000.0, *EVAL_FILTER, codec="mp3-64")
    up = Upsampler.from_checkpoint(checkpoint, device="cpu")
    (plain,) = evaluate(up, [data / "a.wav"], [12000.0], steps=1)["rows"]
    assert plain["degradation"] == [12000.0, *EVAL_FILTER]
    # measured: LSD-LF of the sinc input 0.71 dB plain (the filter's roll-off below the cutoff), 1.07 dB
    # through MP3 64 kbps; half that difference is the margin
    assert row["lsd_lf_sinc"] > plain["lsd_lf_sinc"] + 0.18


# --- evaluation spread over processes ------------------------------------------------------------------


def without_timing(result: dict) -> dict:
    """`result` without rtf, the one figure that is a measured time (it differs from run to run)."""
    rows = [{k: v for k, v in row.items() if k != "rtf"} for row in result["rows"]]
    agg = {name: {k: v for k, v in group.items() if k != "rtf"}
           for name, group in result["aggregate"].items()}
    return {**result, "rows": rows, "aggregate": agg}


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path, data, checkpoint):
    """`accelerate launch --num_processes 2` (CPU, gloo): process 0 scores a.wav and broken.wav, process 1
    b.flac; the main process writes rows, skipped files and aggregates equal to one process's, field by
    field and exactly (rtf aside). Exact, not within a bound: each file is upsampled alone (windows are
    batched within a clip, never across files) by the same weights at one thread, so every float comes
    from the same operations in the same order. noise-30 draws file k's noise from seed + k: had it
    come from a process's own count, b.flac (file 1, process 1's first) would differ."""
    args = ["--checkpoint", str(checkpoint), "--data", str(data), "--cutoffs", "4000", "8000", "--steps", "1",
            "--max-seconds", "0.5", "--degradation", "noise-30", "--seed", "3"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = [sys.executable, "scripts/evaluate.py", *args, "--json", str(one), "--device", "cpu"]
    proc = subprocess.run(single, cwd=ROOT, capture_output=True, text=True, timeout=600, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29541", "scripts/evaluate.py", *args, "--json", str(two)]
    proc = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600, env=DDP_ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| group |") == 1  # the main process alone prints the table
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [(r["file"], r["cutoff"]) for r in b["rows"]] == [(str(data / f), c) for f in ("a.wav", "b.flac")
                                                            for c in (4000.0, 8000.0)]
    assert list(b["skipped"]) == [str(data / "broken.wav")]
    a, b = without_timing(a), without_timing(b)
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        for key in ra:
            assert rb[key] == ra[key], (ra["file"], ra["cutoff"], key)
    assert b == a
    assert two.with_suffix(".md").read_text() == one.with_suffix(".md").read_text()  # the table has no rtf
