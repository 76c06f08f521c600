"""DoRA in LoRALinear (lora.dora) and layer selection by signal-to-noise ratio (lora.select_fraction,
jat/model/spectrum.py): PEFT parity, identity at step 0, what trains, merging, adapter files and a
trainer resume; the SNR estimate and the selection rule."""

import copy
import json
import math

import pytest
import torch
from helpers import ROOT, tiny_trainer, trained_like
from safetensors import safe_open
from torch import nn

from jat.checkpoint import store as ckpt
from jat.checkpoint.adapters import apply_adapter_file, load_adapter_file, save_adapter
from jat.checkpoint.load import load_model
from jat.codecs import LatentNorm
from jat.config import Config, ConfigError, LoraConfig
from jat.model.dit import JaT, model_config
from jat.model.lora import (
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    block_linears,
    dequantize_weight,
    is_adapter_key,
    is_quantized,
    lora_targets,
    merge_lora,
    quantize_linear,
)
from jat.model.spectrum import format_snr_table, mp_median, rank_layers, select_layers, weight_snr

U32 = 2.0 ** -24  # fp32 unit roundoff


# --- small helpers (as tests/test_lora.py's) ------------------------------------------------------


def tiny_base(seed: int = 0, in_channels: int = 8) -> JaT:
    torch.manual_seed(seed)
    return trained_like(JaT(model_config("tiny", in_channels=in_channels)), seed, std=0.05)


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Non-zero adapters; DoRA magnitudes are scaled by a random factor in [0.5, 1.5) instead (they start
    at the weight norms, and must stay positive to mean anything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_magnitude"):
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def inputs(C: int = 8, T: int = 37, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x_t, c = torch.randn(2, C, T, generator=g), torch.randn(2, C, T, generator=g)
    t = torch.rand(2, generator=g)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 21:] = False
    return x_t, t, c, mask


def dcfg(mode: str, temporal: bool = False, **kw) -> LoraConfig:
    return LoraConfig(mode=mode, dora=True, temporal_adapter=temporal, rank=4, alpha=8.0, temporal_dim=16,
                      **kw)


def dora_reference(w0: torch.Tensor, bias, a, b, m, scaling, x):
    """DoRA written out: m / ||W0 + s B A||_row ⊙ (W0 + s B A) x + bias."""
    v = w0 + scaling * (b @ a)
    w = (m / torch.linalg.norm(v, dim=1))[:, None] * v
    return torch.nn.functional.linear(x, w, bias)


def peft_pair(mode: str, dtype=torch.float32, dropout: float = 0.0, r: int = 8, alpha: float = 16.0):
    """Our DoRA layer and PEFT's (`use_dora=True`) on one base, sharing A, B (non-zero) and m (moved off
    its initial value)."""
    peft = pytest.importorskip("peft")
    from peft.tuners import lora as peft_lora

    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(dtype)
    if mode == "qlora":
        base = quantize_linear(base)
        from peft.tuners.lora.bnb import Linear4bit as peft_cls
    else:
        peft_cls = peft_lora.Linear
    ours = LoRALinear(base, r, alpha, dropout, dora=True).to(dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
    theirs = peft_cls(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
    theirs = theirs.to(dtype)
    mag = theirs.lora_magnitude_vector["default"].weight
    if dtype == torch.float32:  # both start at the base's row norms
        assert torch.equal(ours.lora_magnitude, mag)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
        ours.lora_magnitude.mul_(0.5 + torch.rand(48, dtype=dtype))
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        mag.copy_(ours.lora_magnitude)
    return ours, theirs


def grads(ours, theirs):
    return ([ours.lora_A.weight.grad, ours.lora_B.weight.grad, ours.lora_magnitude.grad],
            [theirs.lora_A["default"].weight.grad, theirs.lora_B["default"].weight.grad,
             theirs.lora_magnitude_vector["default"].weight.grad])


# --- PEFT parity -----------------------------------------------------------------------------------


def test_dora_matches_peft_in_float64():
    ours, theirs = peft_pair("lora", torch.float64)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    y, y_ref = ours(x), theirs(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y, dora_reference(ours.base.weight, ours.base.bias, ours.lora_A.weight,
                                                 ours.lora_B.weight, ours.lora_magnitude, ours.scaling, x),
                               rtol=1e-12, atol=1e-12)
    lora = ours.base(x) + ours.lora_B(ours.lora_A(x)) * ours.scaling
    assert (y - lora).abs().max() > 0.1 * y.abs().max()  # the magnitudes matter: not plain LoRA
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(*grads(ours, theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_dora_matches_peft_in_float32(mode):
    ours, theirs = peft_pair(mode)
    x = torch.randn(3, 5, 64)
    y, y_ref = ours(x), theirs(x)
    # The two evaluate the same expression in the same order except B A: PEFT forms it as (Aᵀ Bᵀ)ᵀ
    # through the layers' forward, a sum of r products per entry either way. A sum of k fp32 products
    # is exact to k·u·Σ|terms| (u = 2⁻²⁴), so the row norms agree to about r·u relative and the output,
    # itself a sum of in + r terms, to (in + r)·u·max|y| at worst. (They are in fact bit-equal here.)
    atol = (64 + 8) * U32 * y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=atol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(*grads(ours, theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=(64 + 8) * U32 * b.abs().max().item())
    # and both are DoRA on the dequantized base, written out in float64
    w0 = dequantize_weight(ours.base).double()
    a, b, m = ours.lora_A.weight.double(), ours.lora_B.weight.double(), ours.lora_magnitude.double()
    ref = dora_reference(w0, ours.base.bias.double(), a, b, m, ours.scaling, x.double())
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_dora_dropout_matches_peft(mode):
    ours, theirs = peft_pair(mode, dropout=0.3)
    x = torch.randn(3, 5, 64)
    for train in (True, False):  # train: W0 x recomputed on the dropped-out input; eval: no dropout
        ours.train(train)
        theirs.train(train)
        torch.manual_seed(11)
        y = ours(x)
        torch.manual_seed(11)
        y_ref = theirs(x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=(64 + 8) * U32 * y_ref.abs().max().item())
    ours.train()
    torch.manual_seed(11)
    y = ours(x)
    torch.manual_seed(12)
    assert not torch.allclose(y, ours(x))  # dropout does act


# --- step 0, what trains -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "qlora"])
@pytest.mark.parametrize("temporal", [False, True])
def test_dora_equals_its_base_exactly_at_step0(mode, temporal):
    base = tiny_base()
    plain = apply_lora(copy.deepcopy(base), LoraConfig(mode=mode, temporal_adapter=temporal, rank=4,
                                                       alpha=8.0, temporal_dim=16))  # LoRA: = base at step 0
    model = apply_lora(copy.deepcopy(base), dcfg(mode, temporal))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 6 * 2 + (4 if temporal else 0) and all(m.dora for m in layers)
    for m in layers:  # m starts at the (dequantized) base's row norms
        assert torch.equal(m.lora_magnitude, torch.linalg.norm(dequantize_weight(m.base), dim=1))
    args = inputs()
    with torch.no_grad():
        out = model(*args)
        assert torch.equal(out, plain(*args))
        if mode == "lora" and not temporal:
            assert torch.equal(out, base(*args))


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_only_a_b_and_magnitude_get_gradients(mode):
    model = apply_lora(tiny_base(), dcfg(mode))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    assert {n.rsplit(".", 2)[-2] if n.endswith("weight") else n.rsplit(".", 1)[-1] for n in trainable} \
        == {"lora_A", "lora_B", "lora_magnitude"}
    assert len([n for n in trainable if n.endswith("lora_magnitude")]) == 12
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in trainable}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    for _ in range(2):  # the second step moves A (zero gradient while B is zero)
        model(*inputs()).square().mean().backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in before.items())


# --- merge, adapter files, inference ---------------------------------------------------------------


@pytest.mark.parametrize("mode,temporal,tol", [("lora", False, 1e-5), ("qlora", False, 1e-3),
                                               ("qlora", True, 1e-3)])
def test_merged_dora_matches_the_adapted_model(mode, temporal, tol):
    model = apply_lora(tiny_base(), dcfg(mode, temporal))
    randomize_adapters(model, scale=0.1)
    args = inputs()
    with torch.no_grad():
        out = model(*args)
        merged = merge_lora(copy.deepcopy(model))
        assert not any(isinstance(m, LoRALinear) or is_quantized(m) for m in merged.modules())
        out_m = merged(*args)
        delta = (out - tiny_base()(*args)).norm()
    assert delta > 0.05 * out.norm()
    assert (out_m - out).norm() / out.norm() < tol
    # the merged weight is m ⊙ V / ||V||: its row norms are the magnitudes
    layer = model.blocks[0].attn.q
    w = merged.blocks[0].attn.q.weight
    torch.testing.assert_close(torch.linalg.norm(w, dim=1), layer.lora_magnitude, rtol=1e-5, atol=0)


def test_dora_adapter_file_round_trip(tmp_path):
    cfg = dcfg("qlora", temporal=True)
    model = apply_lora(tiny_base(), cfg)
    randomize_adapters(model)
    path = save_adapter(tmp_path / "adapter.safetensors", model, cfg, base="some/base")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(adapter_state_dict(model))
    assert {k for k in keys if k.endswith("lora_magnitude")} == {f"{n}.lora_magnitude" for n, m in
                                                                  model.named_modules()
                                                                  if isinstance(m, LoRALinear)}
    assert json.loads(meta["targets"]) == lora_targets(model)
    info = load_adapter_file(path)
    assert info.lora == cfg  # no selection: the config as saved
    fresh = tiny_base()
    apply_adapter_file(fresh, path)
    args = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(*args), model(*args))


# --- the SNR and layer selection -------------------------------------------------------------------


def test_marchenko_pastur_median_and_noise_estimate():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 900, generator=g, dtype=torch.float64)
    empirical = torch.linalg.eigvalsh(z @ z.T / 900).median().item()
    assert mp_median(1 / 3) == pytest.approx(empirical, rel=0.01)
    assert mp_median(1.0) == pytest.approx(0.6528, abs=1e-3)  # Gavish & Donoho's table
    for shape in [(64, 64), (64, 256), (256, 64)]:
        sigma, edge, above, top, snr = weight_snr(0.3 * torch.randn(*shape, generator=g))
        assert sigma == pytest.approx(0.3, rel=0.05)
        assert edge == pytest.approx(sigma * (math.sqrt(shape[0]) + math.sqrt(shape[1])))
        # the noise's largest singular value sits at the edge, give or take Tracy-Widom fluctuations and
        # the error of sigma: it may just clear it, which counts as ~ 4 / min(m, n) of the energy
        assert top == pytest.approx(edge, rel=0.1) and above <= 1
        assert snr < 8 / min(shape)


def planted(shape, rank: int, seed: int, signal: float = 0.0, sigma: float = 0.02) -> torch.Tensor:
    """sigma-noise plus (when signal > 0) a rank-`rank` matrix with singular values `signal` times the
    noise edge."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    w = sigma * torch.randn(m, n, generator=g)
    if signal:
        u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
        s = signal * sigma * (math.sqrt(m) + math.sqrt(n)) * torch.linspace(1, 2, rank)
        w += u @ torch.diag(s) @ v.T
    return w


def test_planted_low_rank_signal_ranks_above_noise():
    layers = {}
    for i, (signal, shape) in enumerate([(0, (64, 64)), (3, (64, 64)), (0, (256, 64)), (1.5, (64, 256)),
                                         (0, (64, 256)), (6, (256, 64))]):
        lin = nn.Linear(shape[1], shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(planted(shape, 4, seed=i, signal=signal))
        layers[f"blocks.{i}.attn.q"] = lin
    ranked = rank_layers(layers)
    assert [r.name for r in ranked[:3]] == ["blocks.5.attn.q", "blocks.1.attn.q", "blocks.3.attn.q"]
    assert all(r.above in (4, 5) for r in ranked[:3])  # the planted rank (+ a noise value at the edge)
    assert all(r.above <= 1 and r.snr < 0.15 for r in ranked[3:])
    assert min(r.snr for r in ranked[:3]) > 5 * max(r.snr for r in ranked[3:])  # clearly apart
    chosen = select_layers(ranked, 0.5)
    assert chosen == ["blocks.5.attn.q", "blocks.1.attn.q", "blocks.3.attn.q"]
    assert len(select_layers(ranked, 0.1)) == 1 and len(select_layers(ranked, 1.0)) == 6
    assert len(select_layers(ranked, 0.34)) == 3  # ceil(0.34 · 6) = 3
    table = format_snr_table(ranked, chosen)
    lines = table.splitlines()
    assert len(lines) == 7 and lines[0].split()[:2] == ["layer", "rank"]
    assert lines[1].startswith("blocks.5.attn.q") and " 1/6 " in lines[1] and lines[1].endswith("*")
    assert not lines[-1].endswith("*")


def plant_model(model: JaT) -> set[str]:
    """Give the attention linears of block 0 and the MLP linears of block 1 a strong low-rank signal,
    every other block linear pure noise; returns the planted names."""
    signal = set()
    with torch.no_grad():
        for i, (name, lin) in enumerate(block_linears(model).items()):
            strong = name.startswith("blocks.0.attn.") or name.startswith("blocks.1.mlp.")
            lin.weight.copy_(planted(tuple(lin.weight.shape), 2, seed=100 + i, signal=4.0 if strong else 0.0))
            if strong:
                signal.add(name)
    return signal


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_select_fraction_adapts_the_high_snr_half_and_the_file_records_it(tmp_path, mode):
    base = tiny_base()
    planted_names = plant_model(base)
    cfg = dcfg(mode, select_fraction=0.5)
    model = apply_lora(copy.deepcopy(base), cfg)
    chosen = lora_targets(model)
    assert set(chosen) == planted_names and len(chosen) == 6  # half of the 12 targets, per kind one of two
    randomize_adapters(model)
    path = save_adapter(tmp_path / "a.safetensors", model, cfg)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["targets"]) == chosen and json.loads(meta["lora"])["select_fraction"] == 0.5
    info = load_adapter_file(path)  # resolved: the chosen names, no second ranking
    assert info.lora.targets == chosen and info.lora.select_fraction is None and info.lora.dora
    fresh = copy.deepcopy(base)
    apply_adapter_file(fresh, path)
    assert lora_targets(fresh) == chosen
    args = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(*args), model(*args))


def test_select_fraction_config_range():
    tiny = ROOT / "configs" / "tiny.yaml"
    cfg = Config.from_yaml(tiny, ["lora.select_fraction=0.25", "lora.dora=true"])
    assert cfg.lora.select_fraction == 0.25 and cfg.lora.dora
    assert Config.from_yaml(tiny).lora.select_fraction is None
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"lora.select_fraction: must be in \(0, 1\]"):
            Config.from_yaml(tiny, [f"lora.select_fraction={bad}"])
    with pytest.raises(ConfigError, match="lora.select_fraction: selects among lora.targets"):
        Config.from_yaml(tiny, ["lora.select_fraction=0.5", "lora.targets=[]", "lora.mode=lora",
                                "lora.temporal_adapter=true"])


# --- the trainer: DoRA with selection, checkpoint, resume, inference ---------------------------------


def _write_base_checkpoint(path, seed: int = 0):
    cfg = Config.from_yaml(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(seed)
    model = trained_like(JaT(cfg.model), seed, std=0.05)
    plant_model(model)
    state = model.state_dict()
    tmp = ckpt.begin_save(path, 10)
    ckpt.write_main(tmp, cfg=cfg, step=10, model=state, ema={k: v.clone() for k, v in state.items()},
                    norm=LatentNorm.identity(cfg.model.in_channels).state_dict(),
                    optimizer=torch.optim.AdamW(model.parameters()).state_dict(), state={})
    return ckpt.finish_save(tmp)


@pytest.fixture
def default_denormals():
    """The trainer flushes denormals on CPU (jat/runtime.py), process-wide: put the default back after, so
    later tests (hypothesis, which refuses to run under flush-to-zero) see the process as they expect."""
    yield
    torch.set_flush_denormal(False)


@pytest.mark.slow
def test_trainer_dora_with_selection_resumes_and_infers(tmp_path, default_denormals):
    base_dir = _write_base_checkpoint(tmp_path / "base")
    lora = {"lora.mode": "lora", "lora.dora": "true", "lora.select_fraction": 0.5, "lora.rank": 4,
            "lora.alpha": 8, "train.init_from": str(base_dir)}
    trainer = tiny_trainer(tmp_path / "run", 2, 4, **lora)
    trainer.fit()
    model = trainer.acc.unwrap_model(trainer.model)
    chosen = lora_targets(model)
    assert len(chosen) == 6 and all(n.startswith(("blocks.0.attn.", "blocks.1.mlp.")) for n in chosen)
    last = tmp_path / "run" / "ckpt-00000004"
    info = load_adapter_file(last / "adapter.safetensors")
    assert info.lora.targets == chosen and set(info.state) == set(adapter_state_dict(model))
    assert load_adapter_file(last).lora.targets == sorted(chosen)  # a checkpoint: read off its tensors
    resumed = tiny_trainer(tmp_path / "run", 2, 4, resume=str(tmp_path / "run" / "ckpt-00000003"), **lora)
    resumed.fit()
    final = adapter_state_dict(resumed.acc.unwrap_model(resumed.model))
    assert all(torch.equal(v, final[k]) for k, v in adapter_state_dict(model).items())
    infer, cfg, _ = load_model(base_dir, last / "adapter.safetensors")
    assert cfg.lora.dora and cfg.lora.targets == chosen
    args = inputs(C=512, T=24)
    with torch.no_grad():
        assert torch.equal(infer(*args), trainer.ema_model()(*args))
