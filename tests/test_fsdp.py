"""FSDP (train.distributed=fsdp) over 2 CPU processes (gloo): sharded training equals DDP, resumes bit for
bit, writes the same consolidated checkpoints that inference reads, and validation is spread over the ranks.

Each launch runs tests/fsdp_worker.py, which trains the tiny config in float64 on RandomLatents for 4
steps of 2 micro-batches (so the no-sync accumulation path runs) and validates on 3 synthetic clips at
step 3. float64, because in float32 the two reductions' rounding (~1e-7 relative) flips Adam's sign-like
update where |g| ~ eps (see tests/test_train.py's DDP test), which hides a real difference; in float64
the bound below is tight enough to catch one.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import DDP_ENV, ROOT, TESTS, make_config
from safetensors.torch import load_file

from jat.checkpoint import load
from jat.checkpoint import store as ckpt
from jat.config import ConfigError
from jat.model.dit import JaT
from jat.model.flow import FlowMatching
from jat.train import sharding
from jat.train.validation import Validator

WORKER = TESTS / "fsdp_worker.py"
STEPS, ACCUM, BATCH, CLIPS = 4, 2, 2, 3
LR, EPS = 1e-3, 1e-8  # make_config's learning rate, OptimConfig's AdamW eps


def launch(out, port: int, mode: str, *args) -> list[dict]:
    """Train on 2 processes with train.distributed=`mode` in float64; the ranks' reports."""
    cmd = [str(a) for a in (
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        port, WORKER, out, BATCH, STEPS, "--val-clips", CLIPS, "--float64", *args,
        f"train.distributed={mode}", f"train.grad_accum={ACCUM}", "train.val_every=3")]
    done = subprocess.run(cmd, env=DDP_ENV, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"report-{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An FSDP run, the same run stopped after step 3 then resumed, the DDP run, and a DDP run resuming
    the FSDP run's checkpoint of step 3."""
    root = tmp_path_factory.mktemp("fsdp")
    full = launch(root / "fsdp", 29531, "fsdp")
    launch(root / "part", 29532, "fsdp", "--until", 3)
    torch.manual_seed(999)  # nothing in the resumed run may depend on this process or its RNG
    resumed = launch(root / "part", 29533, "fsdp", "--resume", "auto")
    ddp = launch(root / "ddp", 29534, "ddp")
    cross = launch(root / "cross", 29535, "ddp", "--resume", checkpoint(root, "fsdp", 3))
    return root, {"fsdp": full, "resumed": resumed, "ddp": ddp, "cross": cross}


def checkpoint(root, run, step=STEPS):
    return root / run / ckpt.checkpoint_name(step)


def bound() -> float:
    """How far float64 FSDP and DDP weights may drift apart in STEPS steps (test_fsdp_matches_ddp)."""
    n, u, G = sum(p.numel() for p in JaT(make_config("x", 1, 1).model).parameters()), 2.0**-53, 1.0
    return STEPS * LR * n * u * G / EPS


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # the 5 launches of `runs`, about 20 s each
def test_parameters_and_ema_are_sharded(runs):
    _, reports = runs
    whole = sum(p.numel() for p in JaT(make_config("x", 1, 1).model).parameters())
    fsdp, ddp = reports["fsdp"], reports["ddp"]
    assert all(r["sharded"] for r in fsdp) and not any(r["sharded"] for r in ddp)
    # each rank holds its part (dim-0 shards: halves, up to one row of odd-sized tensors), together all
    assert sum(r["local_elements"] for r in fsdp) == whole
    assert all(r["local_elements"] < 0.55 * whole and r["ema_elements"] == r["local_elements"] for r in fsdp)
    assert all(r["local_elements"] == r["ema_elements"] == whole for r in ddp)


@pytest.mark.slow  # the 5 launches of `runs`, about 20 s each
def test_fsdp_matches_ddp(runs):
    """Sharded and replicated training compute the same steps up to the order of sums.

    With 2 ranks a gradient element's reduction is one addition and a halving either way (exact and
    commutative); what changes is the order of longer sums: the gradient norm (FSDP adds the shards'
    sums of squares, DDP the whole tensors'), over n <= P = 557184 squares, and the fused AdamW's
    blocked loop over shards instead of whole tensors. A gradient element then differs by at most
    n u G (u = 2^-53; G <= 1: gradients are clipped to norm 1); Adam's step is (lr / eps)-Lipschitz in
    g, so after S steps the weights differ by at most S lr n u G / eps = 2.5e-2 lr (to first order),
    while one wrong example or a missed reduction moves them by about lr.
    """
    root, reports = runs
    assert bound() < 0.03 * LR
    for prefix in ("model", "ema"):
        a = ckpt.load_weights(checkpoint(root, "fsdp"), prefix)
        b = ckpt.load_weights(checkpoint(root, "ddp"), prefix)
        assert all(v.dtype == torch.float64 for v in a.values())
        assert max_diff(a, b) <= bound(), prefix
    init = JaT(make_config("x", 1, 1).model).double().state_dict()
    assert max_diff(init, ckpt.load_weights(checkpoint(root, "ddp"), "model")) > 10 * bound()  # it trained
    assert np.allclose(reports["fsdp"][0]["losses"], reports["ddp"][0]["losses"], rtol=1e-9, atol=0)


@pytest.mark.slow  # the 5 launches of `runs`, about 20 s each
def test_resume_is_bit_exact(runs):
    """gloo's collectives and FSDP's reduce-scatter are deterministic for the same inputs, so a resumed
    sharded run repeats the uninterrupted one exactly: losses, weights, EMA and optimizer state."""
    root, reports = runs
    assert reports["resumed"][0]["losses"] == reports["fsdp"][0]["losses"][3:]
    for name in ("weights.safetensors", "optimizer.safetensors"):
        a = load_file(str(checkpoint(root, "fsdp") / name))
        b = load_file(str(checkpoint(root, "part") / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow  # the 5 launches of `runs`, about 20 s each
def test_ddp_resumes_an_fsdp_checkpoint(runs):
    """A DDP run continuing the sharded run's step-3 checkpoint ends where the DDP run does, within the
    same bound (the difference comes from the 3 sharded steps)."""
    root, reports = runs
    for prefix in ("model", "ema"):
        a = ckpt.load_weights(checkpoint(root, "cross"), prefix)
        assert max_diff(a, ckpt.load_weights(checkpoint(root, "ddp"), prefix)) <= bound(), prefix
    assert np.allclose(reports["cross"][0]["losses"], reports["ddp"][0]["losses"][3:], rtol=1e-9, atol=0)


@pytest.mark.slow  # the 5 launches of `runs`, about 20 s each
def test_checkpoint_is_the_normal_format(runs):
    """The sharded run's checkpoint has the DDP one's tensors (names, shapes, dtypes), optimizer layout
    and config, and the inference loader reads it as it reads any other."""
    root, _ = runs
    f, d = checkpoint(root, "fsdp"), checkpoint(root, "ddp")
    for name in ("weights.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(f / name)), load_file(str(d / name))
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    meta = [json.loads(ckpt.read_tensors(p / "optimizer.safetensors")[1]["meta"]) for p in (f, d)]
    assert meta[0] == meta[1]  # the same parameter groups and hyperparameters, parameters by index
    assert ckpt.read_config(f).train.distributed == "fsdp"
    model, _, _ = load.load_model(f)
    ema = ckpt.load_weights(f, "ema")
    assert all(torch.equal(v, ema[k].to(v.dtype)) for k, v in model.state_dict().items())


@pytest.mark.slow  # the 5 launches of `runs`, about 20 s each
def test_validation_is_spread_and_equals_one_process(runs):
    """Rank 0 scored clips 0 and 2, rank 1 clip 1; the gathered means are what one process computes from
    the checkpoint's EMA weights (written after that validation)."""
    root, reports = runs
    assert [r["scored"] for r in reports["fsdp"]] == [[0, 2], [1]]
    path = checkpoint(root, "fsdp", 3)
    got = json.loads((path / "state.json").read_text())["metric"]
    from fsdp_worker import clips

    cfg = ckpt.read_config(path)
    # As in the workers: float64 and one thread (CHILD_ENV). The network runs in float64, but the audio
    # around it is float32 (the upsampler's resampling, decoding, low-frequency replacement, metrics); at
    # another thread count float32 kernels sum in another order, and in the sinc input's empty band,
    # whose power is itself float32 rounding, that changes log spectra by O(1) per bin: the LSDs then
    # differ by ~1e-6 (seen: 4.7843223 against 4.7843212), a difference no bound derived from the
    # network's float64 arithmetic covers. At the workers' thread count the same operations on the same
    # shapes repeat exactly, so what is left is the network's float64 rounding.
    threads = torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        model = JaT(cfg.model).eval()
        model.load_state_dict(ckpt.load_weights(path, "ema"))
        want = Validator(clips(CLIPS), steps=2, log_media=False, window_seconds=1.0)(
            model, load.latent_space(path, cfg), FlowMatching(cfg.flow))
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(threads)
    # float64 operations up to FSDP's order of sums (~1e-16 relative each), amplified through 2 sampler
    # steps and log spectra: far below 1e-9
    for key, value in want.items():
        if key != "rtf":
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_fsdp_shards_full_training_in_several_processes_only():
    cfg = make_config("x", 1, 1, **{"train.distributed": "fsdp"})
    assert sharding.wanted(cfg, 2) and not sharding.wanted(cfg, 1)  # one process: nothing to shard
    assert not sharding.wanted(make_config("x", 1, 1), 2)  # ddp, the default
    cfg.lora.mode = "lora"
    with pytest.raises(ConfigError, match="train.distributed=fsdp with lora.mode=lora: FSDP shards full"):
        sharding.wanted(cfg, 2)
