"""The trainer: schedule, optimizer groups, EMA, atomic checkpoints, exact resume, and DDP on CPU."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import DDP_ENV, ROOT, WORKER, RandomLatents, ddp_launch, make_config, tiny_trainer
from safetensors.torch import load_file

from jat.checkpoint import store as ckpt
from jat.codecs import LatentNorm
from jat.config import Config
from jat.model.dit import JaT, model_config
from jat.train.data import StepBatches, prepare
from jat.train.optim import EMA, build_optimizer, lr_lambda
from jat.train.trainer import Trainer


def test_lr_schedule_warmup_then_cosine():
    cfg = Config.from_dict({"optim": {"warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1},
                            "train": {"max_steps": 110}})
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    cfg.optim.schedule = "constant"
    assert lr_lambda(cfg)(100) == 1.0


def test_weight_decay_only_on_trainable_matrices():
    model = JaT(model_config("tiny", in_channels=8))
    model.patch_embed.requires_grad_(False)
    opt = build_optimizer(model, Config(), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}


def test_ema_tracks_with_warmup():
    lin = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    ema = EMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin, 0)  # warm-up decay min(0.9, 1/10) = 0.1
    assert ema.shadow[0].item() == pytest.approx(0.9)
    ema.update(lin, 100)  # decay 0.9
    assert ema.shadow[0].item() == pytest.approx(0.9 + 0.1 * 0.1)


def test_step_batches_partition_the_global_batch():
    a = StepBatches(20, 2, 0, 2, seed=5)
    b = StepBatches(20, 2, 1, 2, seed=5)
    single = StepBatches(20, 4, 0, 1, seed=5)
    for ra, rb, s in zip(a.epoch_batches(3), b.epoch_batches(3), single.epoch_batches(3), strict=True):
        assert ra + rb == s and not set(ra) & set(rb)
    assert list(a.epoch_batches(0, start=2)) == list(a.epoch_batches(0))[2:]


def _run(out, batch, steps, resume=None, until=None):
    trainer = tiny_trainer(out, batch, steps, resume=resume)
    trainer.fit(until=until)
    return trainer


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full", 2, 7)
    _run(tmp_path / "part", 2, 7, until=3)  # the same run, stopped after step 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "part")] == ["ckpt-00000003"]
    torch.manual_seed(999)  # resume must not depend on the fresh process's RNG
    resumed = _run(tmp_path / "part", 2, 7, resume="auto")
    assert resumed.history == full.history[3:]  # step for step, bit for bit
    a = full.acc.unwrap_model(full.model).state_dict()
    b = resumed.acc.unwrap_model(resumed.model).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(full.ema.shadow, resumed.ema.shadow, strict=True))
    # keep_last=2: steps 6 and 7 remain; all complete, no temporary directories left
    names = sorted(p.name for p in (tmp_path / "part").iterdir() if p.name.startswith(("ckpt", ".tmp")))
    assert names == ["ckpt-00000006", "ckpt-00000007"]


def test_checkpoint_contents_and_config(tmp_path):
    trainer = _run(tmp_path / "run", 2, 3)
    path = ckpt.latest_checkpoint(tmp_path / "run")
    cfg = ckpt.read_config(path)
    assert cfg == trainer.cfg
    weights = load_file(str(path / "weights.safetensors"))
    prefixes = {k.split(".", 1)[0] for k in weights}
    assert prefixes == {"model", "ema", "norm"}
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 3 and "scheduler" in state
    assert (path / "rng-0.safetensors").is_file() and (path / "optimizer.safetensors").is_file()
    ema = ckpt.load_weights(path, "ema")
    model = ckpt.load_weights(path, "model")
    assert any(not torch.equal(ema[k], model[k]) for k in model)  # EMA is its own average


def test_stale_temporary_checkpoint_is_ignored_and_cleaned(tmp_path):
    out = tmp_path / "run"
    _run(out, 2, 6, until=3)
    # a run killed while writing step 6 leaves a partial temporary directory
    (out / ".tmp-ckpt-00000006").mkdir()
    (out / ".tmp-ckpt-00000006" / "weights.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(out).name == "ckpt-00000003"
    resumed = _run(out, 2, 6, resume="auto")
    assert resumed.step == 6 and not (out / ".tmp-ckpt-00000006").exists()
    assert ckpt.latest_checkpoint(out).name == "ckpt-00000006"


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    class Poisoned(RandomLatents):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "x": item["x"] * float("nan")}

    trainer = tiny_trainer(tmp_path / "bad", 2, 20, data=Poisoned(), **{"train.max_bad_steps": 3})
    before = {k: v.clone() for k, v in trainer.acc.unwrap_model(trainer.model).state_dict().items()}
    from jat.train.trainer import TrainingError

    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        trainer.fit()
    after = trainer.acc.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.skipped_steps == 3 and ckpt.latest_checkpoint(tmp_path / "bad").name == "ckpt-00000003"


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    """2 processes x batch 2 compute the same steps as 1 process x batch 4, up to the order of sums.

    Compared in float64, where the comparison is exact in principle and rounding is negligible. (In
    float32 the all-reduce's summation order changes near-zero gradients by ~1e-7 relative, which
    flips Adam's sign-like update m / (sqrt(v) + eps) where |g| ~ eps: on an AMX Xeon 3 of 40 tensors
    moved by up to 0.12 lr.) Bound: a gradient element computed in two summation orders differs by at
    most n u G, with u = 2^-53, n <= 1e4 the longest chain of sums behind it (the 2 C p = 4096-wide
    patch embedding, then 6 tokens x 4 examples and the 2-way all-reduce, through 2 blocks) and
    G <= 1 (gradients are clipped to norm 1). Adam's step is (lr / eps)-Lipschitz in g, so after
    S = 4 steps the weights differ by at most S lr n u G / eps = 4.4e-4 lr, while one wrong example
    or a missed reduction moves them by about lr.
    """
    launch = ddp_launch(29517, tmp_path / "ddp", 2, 4, "--float64")
    subprocess.run(launch, check=True, env=DDP_ENV, cwd=ROOT, timeout=600, capture_output=True)
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one"), "4", "4", "--float64"], check=True,
                   env=DDP_ENV, cwd=ROOT, timeout=600, capture_output=True)
    seen0 = set(json.loads((tmp_path / "ddp" / "seen-0.json").read_text()))
    seen1 = set(json.loads((tmp_path / "ddp" / "seen-1.json").read_text()))
    assert seen0 and seen1 and not seen0 & seen1  # each rank saw different examples
    assert seen0 | seen1 == set(json.loads((tmp_path / "one" / "seen-0.json").read_text()))
    one = load_file(str(tmp_path / "one" / "final-0.safetensors"))
    steps, lr, eps, n, u, G = 4, 1e-3, 1e-8, 1e4, 2.0**-53, 1.0
    bound = steps * lr * n * u * G / eps
    assert bound < 1e-3 * lr  # far below what a wrong example or a missed reduction does
    for rank in (0, 1):
        ddp = load_file(str(tmp_path / "ddp" / f"final-{rank}.safetensors"))
        for k in one:
            assert ddp[k].dtype == torch.float64, k
            assert float((ddp[k] - one[k]).abs().max()) <= bound, k
    # and training did move the weights, by far more than the bound
    init = JaT(make_config("x", 1, 1).model).double().state_dict()
    moved = max(float((init[k] - one[k]).abs().max()) for k in one if k in init)
    assert moved > 100 * bound
    losses0 = json.loads((tmp_path / "ddp" / "losses-0.json").read_text())
    assert losses0 == pytest.approx(json.loads((tmp_path / "one" / "losses-0.json").read_text()), rel=1e-9)


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_plain_names(tmp_path):
    trainer = tiny_trainer(tmp_path / "c", 2, 2, **{"train.compile": "true", "train.ckpt_every": 2})
    trainer.fit()
    weights = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "c"), "ema")
    assert set(weights) == set(JaT(trainer.cfg.model).state_dict())  # no "_orig_mod." prefixes
    assert len(trainer.history) == 2 and all(math.isfinite(x) for x in trainer.history)


# --- refused: another architecture, non-finite weights ------------------------------------------


def test_resume_with_another_architecture_names_the_changed_settings(tmp_path):
    out = tmp_path / "run"
    _run(out, 2, 6, until=3)
    with pytest.raises(ckpt.CheckpointError) as err:
        tiny_trainer(out, 2, 6, resume="auto", **{"model.depth": 3, "model.num_heads": 2})
    assert str(err.value) == (f"{out / 'ckpt-00000003'} was trained with a different architecture: "
                              "model.depth 2 -> 3; model.num_heads 4 -> 2 (resume with its settings, "
                              "or choose another train.output_dir)")


def test_resume_with_tensors_that_do_not_fit_is_one_checkpoint_error(tmp_path):
    out = tmp_path / "run"
    _run(out, 2, 6, until=3)
    weights = out / "ckpt-00000003" / "weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:  # the same config, yet a tensor gone (checksums rewritten)
        meta = {k: v for k, v in f.metadata().items() if not k.startswith("sha256")}
    tensors = {k: v for k, v in load_file(str(weights)).items() if k != "model.final_layer.linear.bias"}
    ckpt.save_tensors(tensors, weights, meta, groups=ckpt.WEIGHT_PREFIXES)
    with pytest.raises(ckpt.CheckpointError, match="model weights do not fit the stored config: "
                                                   "1 missing .first: final_layer.linear.bias."):
        _run(out, 2, 6, resume="auto")


def _nan_checkpoint(root):
    """A tiny checkpoint, its checksums right, whose EMA weights hold a NaN."""
    cfg = make_config(str(root), 2, 3)
    state = JaT(cfg.model).state_dict()
    ema = {k: v.clone() for k, v in state.items()}
    ema["blocks.0.attn.q.weight"][1, 2] = float("nan")
    tmp = ckpt.begin_save(root, 1)
    ckpt.write_main(tmp, cfg=cfg, step=1, model=state, ema=ema, norm=LatentNorm.identity(512).state_dict(),
                    optimizer={"state": {}, "param_groups": []}, state={})
    return ckpt.finish_save(tmp)


def test_non_finite_weights_are_refused_for_inference_and_init_from(tmp_path):
    from jat.checkpoint.load import load_model

    path = _nan_checkpoint(tmp_path / "nan")
    msg = f"{path / 'weights.safetensors'}: tensor ema.blocks.0.attn.q.weight holds non-finite values"
    with pytest.raises(ckpt.CheckpointError, match=msg):
        load_model(path)
    cfg = make_config(str(tmp_path / "ft"), 2, 3, **{"train.init_from": str(path)})
    with pytest.raises(ckpt.CheckpointError, match=msg):
        Trainer(cfg, prepare(cfg, RandomLatents()))


def test_weights_that_became_non_finite_are_never_saved(tmp_path):
    from jat.train.trainer import TrainingError

    out = tmp_path / "run"
    trainer = tiny_trainer(out, 2, 20, **{"train.max_bad_steps": 2})
    trainer.fit(until=3)
    with torch.no_grad():  # what a too large learning rate does: the weights diverge, every step skips
        trainer.model_plain.blocks[0].attn.q.weight.fill_(float("nan"))
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert str(err.value) == (f"step 5: the weights became non-finite (tensor model.blocks.0.attn.q.weight "
                              f"holds NaN or inf): nothing saved; the newest intact checkpoint is "
                              f"{out / 'ckpt-00000003'}")
    assert [p.name for p in out.iterdir() if "ckpt" in p.name] == ["ckpt-00000003"]
    assert ckpt.load_weights(out / "ckpt-00000003", "model")  # the earlier one loads, finite

    fresh = tiny_trainer(tmp_path / "new", 2, 20)
    fresh.ema.shadow[0].fill_(float("inf"))
    with pytest.raises(TrainingError, match=r"non-finite \(tensor ema\.\S+ holds NaN or inf\): nothing "
                                            f"saved; there is no intact checkpoint in {tmp_path / 'new'}$"):
        fresh.save()
    assert not [p for p in (tmp_path / "new").iterdir() if "ckpt" in p.name]
    fresh.close()
