"""The benchmark's FLOP count and its plain reference are right, so its ratios mean something."""

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, trained_jat
from torch.utils.flop_counter import FlopCounterMode

from jat.evaluation.benchmark import RefJaT, forward_flops, measure_train, tokenwise_weights, train_flops
from jat.model.dit import JaT, model_config


def test_tokenwise_weights_match_the_model_layers():
    for preset, C in (("v2", 1024), ("small", 512), ("tiny", 8)):
        cfg = model_config(preset, in_channels=C)
        with torch.device("meta"):
            model = JaT(cfg)
        linears = [model.patch_embed.proj1, model.patch_embed.proj2, model.final_layer.linear]
        for b in model.blocks:
            linears += [b.attn.q, b.attn.k, b.attn.v, b.attn.out, b.mlp.fc1, b.mlp.fc2]
        assert tokenwise_weights(cfg) == sum(m.weight.numel() for m in linears)


PER_SAMPLE = re.compile(r"JaT\.(t_embedder|blocks\.\d+\.adaLN_modulation|final_layer\.adaLN_modulation)")


@pytest.mark.parametrize("preset,C", [("tiny", 8), ("small", 16)])
def test_forward_flops_are_the_matmul_flops_a_forward_pass_runs(preset, C):
    """forward_flops = every matmul FLOP of a forward pass, as torch's FlopCounterMode counts them while
    the model runs (attention included), but the per-sample ones (time embedding, adaLN), which do not
    grow with the clip; with a ragged last patch too (T not a multiple of the patch size)."""
    cfg = model_config(preset, in_channels=C)
    model = JaT(cfg)
    for batch, frames in ((1, 40), (2, 81), (3, 130)):
        x = torch.randn(batch, C, frames)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, torch.rand(batch), x)
        per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
        per_sample = sum(n for name, n in per_module.items() if PER_SAMPLE.fullmatch(name))
        assert per_sample > 0 and per_sample % batch == 0
        assert counter.get_total_flops() - per_sample == forward_flops(cfg, batch, frames), (batch, frames)


def _copy_into_reference(model: JaT, ref: RefJaT) -> None:
    pairs = {"embed1": model.patch_embed.proj1, "embed2": model.patch_embed.proj2,
             "t1": model.t_embedder.mlp[0], "t2": model.t_embedder.mlp[2],
             "final_ada": model.final_layer.adaLN_modulation[1], "final": model.final_layer.linear}
    for name, src in pairs.items():
        getattr(ref, name).load_state_dict(src.state_dict())
    for rb, b in zip(ref.blocks, model.blocks, strict=True):
        for name in ("q", "k", "v", "out"):
            getattr(rb, name).load_state_dict(getattr(b.attn, name).state_dict())
        rb.fc1.load_state_dict(b.mlp.fc1.state_dict())
        rb.fc2.load_state_dict(b.mlp.fc2.state_dict())
        rb.ada.load_state_dict(b.adaLN_modulation[1].state_dict())


def _model_and_reference() -> tuple[JaT, RefJaT]:
    """A small trained-looking JaT (every parameter non-zero), and the reference holding the same weights."""
    cfg = model_config("small", in_channels=16)
    model = trained_jat(cfg, seed=0, std=0.05)
    ref = RefJaT(cfg)
    _copy_into_reference(model, ref)
    return model, ref


def test_reference_computes_the_same_function():
    model, ref = _model_and_reference()
    x, c, t = torch.randn(2, 16, 13), torch.randn(2, 16, 13), torch.rand(2)
    with torch.no_grad():
        assert torch.allclose(model(x, t, c), ref(x, t, c), atol=1e-4, rtol=1e-4)


def test_measure_train_times_real_training_steps():
    """The figures are measurements of real steps: the weights moved, the exact FLOP count of the shape
    is reported, and one warm-up plus one timed call of each half fit in the call's own wall time."""
    cfg = model_config("tiny", in_channels=8)
    model = JaT(cfg)
    opt = torch.optim.AdamW(model.parameters(), fused=True, weight_decay=0.0)
    before = model.final_layer.linear.bias.detach().clone()
    tic = time.perf_counter()
    r = measure_train(model, opt, cfg, batch=2, frames=40, dtype="fp32", repeats=1)
    wall = time.perf_counter() - tic
    assert not torch.equal(model.final_layer.linear.bias, before)  # gradients flowed and steps were taken
    assert r["flops"] == train_flops(cfg, 2, 40)
    assert 0 < 2 * r["fwd_bwd_s"] + 2 * r["opt_s"] <= wall  # each half ran twice, the best time is kept
    assert r["fwd_bwd_flops_per_s"] >= r["flops"] / wall and r["tokens_per_s"] >= 2 * 10 / wall


def test_bf16_autocast_is_as_accurate_as_a_plain_autocast_model():
    """The stream stays in bf16 (norms, modulation, RoPE, softmax without fp32 round trips) and adaLN
    runs in fp32: output and gradients stay as close to fp32 as the plain reference's bf16 run."""
    model, ref = _model_and_reference()
    x, c, t = torch.randn(2, 16, 64), torch.randn(2, 16, 64), torch.rand(2)

    def run(m, bf16):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x, t, c).float()
        out.pow(2).mean().backward()
        return out.detach(), m.blocks[0].fc1.weight.grad if m is ref else m.blocks[0].mlp.fc1.weight.grad

    truth, g_truth = run(model, False)
    ours, g_ours = run(model, True)
    plain, g_plain = run(ref, True)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(ours, truth) < 0.02 and rel(g_ours, g_truth) < 0.05
    assert rel(ours, truth) < 1.5 * rel(plain, truth)
    assert rel(g_ours, g_truth) < 1.5 * rel(g_plain, g_truth)


@pytest.mark.slow
def test_benchmark_script_end_to_end(tmp_path):
    """scripts/benchmark.py on the tiny config: the training, ablation, inference and streaming memory
    tables are measured, each side runs with the runtime settings it claims, and the figures are in range."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--configs", "tiny", "--batches", "2",
           "--dtypes", "bf16", "--rounds", "1", "--repeats", "1", "--seconds", "1", "--infer-seconds", "1",
           "--infer-steps", "2", "--no-dac", "--no-finetune", "--memory-minutes", "0.05",
           "--rtf-configs", "tiny", "--rtf-seconds", "1", "--rtf-evals", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    k = "train.tiny.bf16.b2"
    assert 0 < r[f"{k}.mfu"] < 1  # a fraction of this machine's measured matmul peak
    assert 0 < r[f"{k}.speedup_vs_ref"] < r[f"{k}.speedup_ceiling"]  # nothing beats every matmul at the peak
    assert 0 < r[f"{k}.speedup_vs_ref_tuned"] < math.inf
    assert r[f"{k}.cpu_tuned"] is True and r[f"{k}.ref.cpu_tuned"] is False
    assert r[f"{k}.ours_untuned.cpu_tuned"] is False and r[f"{k}.ref_tuned.cpu_tuned"] is True
    assert 0 < r["infer.tiny.bf16.s2.mfu"] < 1 and r["infer.tiny.bf16.s2.nfe"] == 3
    assert r["infer.tiny.bf16.s2.network_rtf"] == pytest.approx(r["infer.tiny.bf16.s2.network_s"] / 1.0)
    assert "infer.tiny.bf16.s2.codec_s" not in r  # the codec is timed once, in the codec and rtf sections
    assert "whole step" in proc.stdout and "runtime ablation" in proc.stdout
    assert r["memory.stream.m0.05.peak_mb"] > 100 and r["memory.stream.max_over_min"] == 1.0  # one row
    k = "rtf.tiny.mdct.s1.e1"  # the end-to-end row (--no-dac: no codec section, the rtf rows on mdct)
    stages = sum(r[f"{k}.{s}_s"] for s in ("read", "encode", "network", "decode", "lfr", "write", "other"))
    assert stages == pytest.approx(r[f"{k}.total_s"]) and r[f"{k}.rtf"] == pytest.approx(r[f"{k}.total_s"])
    assert not any(key.startswith("codec.") for key in r)


def test_best_of_rounds_alternates_cases_and_keeps_each_ones_fastest(monkeypatch):
    from jat.cli import benchmark as script
    times = iter([3.0, 5.0, 2.0, 6.0, 4.0, 4.0])  # A B A B A B
    calls = []

    def fake_run_case(*args, env=None):
        calls.append((args[0], env))
        return {"step_s": next(times), "case": args[0]}

    monkeypatch.setattr(script, "run_case", fake_run_case)
    best = script.best_of_rounds({"A": ("a",), "B": ("b",)}, rounds=3, env={"B": {"X": "1"}})
    assert calls == [("a", None), ("b", {"X": "1"})] * 3
    assert best["A"]["step_s"] == 2.0 and best["B"]["step_s"] == 4.0


def test_stream_stays_bf16_and_adaln_runs_in_its_weights_dtype_under_autocast():
    model = JaT(model_config("tiny", in_channels=8))
    seen = {}
    block = model.blocks[0]
    # autocast would hand back a bf16 product; ours runs the layer in its weights' fp32
    block.adaLN_modulation[1].register_forward_hook(lambda m, i, o: seen.update(ada_out=o.dtype))
    block.attn.q.register_forward_hook(lambda m, i, o: seen.update(attn_in=i[0].dtype))
    block.mlp.fc1.register_forward_hook(lambda m, i, o: seen.update(mlp_in=i[0].dtype))
    x, c, t = torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.rand(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, c)
    assert seen == {"ada_out": torch.float32, "attn_in": torch.bfloat16, "mlp_in": torch.bfloat16}
    assert out.dtype == torch.bfloat16


def test_memory_section_measures_each_length_in_its_own_process(capsys):
    """The benchmark's streaming memory rows: one per length, each a child process's own peak (the whole
    process: Python, torch and the model, far above 100 MB, below this machine's memory), the streaming
    timed, and the flatness ratio written from the rows' own peaks."""
    from jat.cli.benchmark import memory_section

    out: dict = {}
    memory_section([0.05, 0.1], out)
    peaks = [out[f"memory.stream.m{m}.peak_mb"] for m in ("0.05", "0.1")]
    assert all(100 < p < 64 * 1024 for p in peaks)
    assert all(out[f"memory.stream.m{m}.seconds"] > 0 for m in ("0.05", "0.1"))
    assert out["memory.stream.m0.1.rtf"] == pytest.approx(out["memory.stream.m0.1.seconds"] / 6.0)
    assert out["memory.stream.max_over_min"] == pytest.approx(max(peaks) / min(peaks))
    printed = capsys.readouterr().out
    assert "streaming inference memory" in printed and "max / min peak" in printed
    assert len(out) == 2 * 3 + 1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the child's own peak needs /proc")
def test_memory_rows_do_not_count_the_starting_process():
    """A starter holding 2 GB does not inflate the children's peaks: each child reports its own high-water
    mark since exec (Linux's ru_maxrss of a child would also carry the starter's resident size)."""
    from jat.evaluation.memory import streaming_peak_memory

    held = np.ones(2**28)  # 2 GiB of float64, resident in this process
    [row] = streaming_peak_memory([0.05])
    assert held.sum() == 2**28
    assert 100 < row["peak_mb"] < 1800  # a small stream's own process (about 0.8 GB), not this one's 2+ GB
