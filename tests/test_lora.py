"""LoRA / QLoRA (jat/model/lora.py): identity at step 0, frozen base, PEFT parity, adapter files, merging,
reload in a new process, and a tiny QLoRA fine-tune."""

import copy
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, flip_byte, tiny_trainer, trained_jat
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from jat.checkpoint import store as ckpt
from jat.checkpoint.adapters import apply_adapter_file, load_adapter_file, save_adapter
from jat.checkpoint.load import load_model, merge_checkpoint
from jat.codecs import LatentNorm
from jat.config import Config, FlowConfig, LoraConfig
from jat.model.dit import JaT, model_config
from jat.model.flow import FlowMatching
from jat.model.lora import (
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    block_linears,
    dequantize_weight,
    is_adapter_key,
    is_quantized,
    load_adapter,
    lora_report,
    merge_lora,
    quantize_linear,
)

QUANT_WORDS = ("absmax", "quant_map", "quant_state", "nested")
STD = 0.1  # trained_jat's scale for what a new JaT starts at zero: the adapters move the output clearly


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Non-zero adapters (B and gamma start at zero, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_base(seed: int = 0, in_channels: int = 8) -> JaT:
    return trained_jat(model_config("tiny", in_channels=in_channels), seed, std=STD)


def inputs(C: int = 8, T: int = 37, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x_t, c = torch.randn(2, C, T, generator=g), torch.randn(2, C, T, generator=g)
    t = torch.rand(2, generator=g)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 21:] = False  # the second example is padded: exercises key masks in attention and the conv
    return x_t, t, c, mask


def lcfg(mode: str, temporal: bool = False, **kw) -> LoraConfig:
    return LoraConfig(mode=mode, temporal_adapter=temporal, rank=4, alpha=8.0, temporal_dim=16, **kw)


# --- step 0 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", [False, True])
def test_lora_mode_equals_base_exactly_at_step0(temporal):
    base = tiny_base()
    model = apply_lora(copy.deepcopy(base), lcfg("lora", temporal))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6 * 2 + (4 if temporal else 0)
    args = inputs()
    with torch.no_grad():
        assert torch.equal(model(*args), base(*args))


def test_qlora_equals_base_with_dequantized_nf4_block_linears():
    base = tiny_base()
    model = apply_lora(copy.deepcopy(base), lcfg("qlora"))
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, lin in block_linears(ref).items():
            q = model.get_submodule(name)
            q = q.base if isinstance(q, LoRALinear) else q
            assert is_quantized(q), name  # every block linear, adaLN included
            assert q.weight.quant_state.nested and q.weight.quant_state.quant_type == "nf4"  # double quant
            lin.weight.copy_(dequantize_weight(q))
    for name in ("patch_embed.proj1", "t_embedder.mlp.0", "final_layer.linear"):  # outside blocks: untouched
        assert not is_quantized(model.get_submodule(name))
    args = inputs()
    with torch.no_grad():
        out = model(*args)
        assert torch.equal(out, ref(*args))
        assert not torch.equal(out, base(*args))  # quantization did happen
        model.eval()  # bitsandbytes' bf16 CPU inference repacking stays off: eval computes the same
        assert torch.equal(model(*args), out)


# --- frozen base ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_only_adapters_get_gradients_and_change(mode):
    from jat.train.optim import build_optimizer

    model = apply_lora(tiny_base(), lcfg(mode, temporal=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and trainable
    assert all("lora_" in n or ".temporal." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # quantization state included
    adapters = {k: v.clone() for k, v in adapter_state_dict(model).items()}

    cfg = Config()
    cfg.optim.lr, cfg.optim.weight_decay = 1e-2, 0.1
    opt = build_optimizer(model, cfg, "cpu")
    for _ in range(2):  # the second step moves A too (its gradient is zero while B is)
        x_t, t, c, mask = inputs()
        model(x_t, t, c, mask).square().mean().backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        opt.zero_grad(set_to_none=True)

    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k not in adapters:
            assert torch.equal(after[k], v), f"frozen tensor {k} changed"
    changed = [k for k, v in adapters.items() if not torch.equal(after[k], v)]
    assert set(changed) == set(adapters)


def test_target_patterns():
    model = apply_lora(tiny_base(), lcfg("lora", targets=["attn.*"]))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"blocks.{i}.attn.{k}" for i in range(2) for k in ("q", "k", "v", "out")}
    model = apply_lora(tiny_base(), lcfg("lora", targets=["fc?", "blocks.0.attn.q"]))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2",
                       "blocks.0.attn.q"}
    with pytest.raises(ValueError, match="qkv"):
        apply_lora(tiny_base(), lcfg("lora", targets=["q", "qkv"]))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, lcfg("lora"))


def test_report_counts_logical_parameters_and_frozen_bytes():
    base = tiny_base()
    n_base = sum(p.numel() for p in base.parameters())
    r_lora = lora_report(apply_lora(copy.deepcopy(base), lcfg("lora")))
    r_q = lora_report(apply_lora(copy.deepcopy(base), lcfg("qlora")))
    adapters = 4 * sum(m.in_features + m.out_features for n, m in block_linears(base).items()
                       if not n.endswith("adaLN_modulation.1"))
    for r in (r_lora, r_q):
        assert r["trainable"] == adapters and r["frozen"] == n_base
        assert r["ratio"] == pytest.approx(adapters / (adapters + n_base))
    block_w = sum(m.weight.numel() for m in block_linears(base).values())
    assert r_lora["frozen_bytes"] == 4 * n_base
    # NF4 stores half a byte per block weight (+ statistics) instead of four
    saved = r_lora["frozen_bytes"] - r_q["frozen_bytes"]
    assert 3.2 * block_w < saved < 3.5 * block_w


# --- PEFT parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_lora_linear_matches_peft(mode):
    peft = pytest.importorskip("peft")
    from peft.tuners import lora as peft_lora

    torch.manual_seed(0)
    r, alpha = 8, 16
    base = nn.Linear(64, 48)
    if mode == "qlora":
        base = quantize_linear(base)
        from peft.tuners.lora.bnb import Linear4bit as peft_cls
    else:
        peft_cls = peft_lora.Linear
    ours = LoRALinear(base, r, alpha)
    theirs = peft_cls(base, "default", config=peft.LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    with torch.no_grad():
        ours.lora_B.weight.normal_()  # B starts at zero: give it values so the update shows
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert ours.scaling == theirs.scaling["default"] == alpha / r

    x = torch.randn(3, 5, 64)
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.equal(y_ours, y_theirs)
    g = torch.randn_like(y_ours)
    y_ours.backward(g)
    y_theirs.backward(g)
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default").float())


def test_lora_init_is_kaiming_a_and_zero_b():
    layer = LoRALinear(nn.Linear(256, 128), rank=16, alpha=32)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / math.sqrt(3)


# --- adapter files -----------------------------------------------------------------------------


def test_adapter_file_holds_only_adapters_and_round_trips(tmp_path):
    cfg = lcfg("qlora", temporal=True)
    model = apply_lora(tiny_base(), cfg)
    randomize_adapters(model)
    path = save_adapter(tmp_path / "adapter.safetensors", model, cfg, base="some/base")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(adapter_state_dict(model))
    assert not [k for k in keys if any(w in k for w in QUANT_WORDS)]
    assert all(is_adapter_key(k) for k in keys)
    state, cfg2, base, base_sha256 = load_adapter_file(path)
    assert cfg2 == cfg and base == "some/base" and meta["format"] == "jat-lora-1"
    assert base_sha256 is None  # "some/base" is no checkpoint: no identity to record

    fresh = tiny_base()
    apply_adapter_file(fresh, path)
    args = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(*args), model(*args))
    with pytest.raises(ValueError, match="missing"):
        load_adapter(apply_lora(tiny_base(), cfg), {k: v for k, v in state.items() if "gamma" not in k})
    with pytest.raises(ValueError, match="quantization state"):
        bad = {**state, "blocks.0.attn.q.base.weight.absmax": torch.ones(1)}
        load_adapter(apply_lora(tiny_base(), cfg), bad)


def test_v2_adapter_is_below_5_percent_of_base_checkpoint():
    with torch.device("meta"):  # sizes only: no memory, no quantization
        base = JaT(model_config("v2"))
    n_base = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, LoraConfig(mode="lora", rank=16, alpha=32.0))
    n_adapter = sum(p.numel() for p in adapter_state_dict(model).values())
    # r (in + out) per target (q, k, v, out, fc1, fc2), 16 blocks
    assert n_adapter == 16 * 16 * (2048 + 1280 + 1280 + 2048 + 5120 + 5120)
    base_ckpt_bytes = 2 * 4 * n_base  # model + EMA in fp32
    assert 4 * n_adapter < 0.05 * base_ckpt_bytes and 4 * n_adapter < 0.05 * 4 * n_base


def _write_base_checkpoint(path: Path, seed: int = 0) -> tuple[Path, Config]:
    """A tiny trained-looking base checkpoint as the trainer would write it (tiny.yaml: mdct, C = 512)."""
    cfg = Config.from_yaml(ROOT / "configs" / "tiny.yaml")
    model = trained_jat(cfg.model, seed, std=STD)
    norm = LatentNorm.identity(cfg.model.in_channels)
    tmp = ckpt.begin_save(path, 10)
    state = model.state_dict()
    ckpt.write_main(tmp, cfg=cfg, step=10, model=state, ema={k: v.clone() for k, v in state.items()},
                    norm=norm.state_dict(), optimizer=torch.optim.AdamW(model.parameters()).state_dict(),
                    state={})
    return ckpt.finish_save(tmp), cfg


def _adapted_base(tmp_path, seed):
    """A base checkpoint, the QLoRA model (with temporal adapters) built on it with random adapters,
    and the saved adapter file."""
    base_dir, cfg = _write_base_checkpoint(tmp_path / "base")
    lora = lcfg("qlora", temporal=True)
    model, _, _ = load_model(base_dir)
    apply_lora(model, lora)
    randomize_adapters(model, seed=seed)
    adapter = save_adapter(tmp_path / "adapter.safetensors", model, lora, base=str(base_dir))
    return base_dir, cfg, model, adapter


def test_base_plus_adapter_reproduces_outputs_bit_for_bit_in_new_process(tmp_path):
    base_dir, cfg, model, adapter = _adapted_base(tmp_path, seed=7)
    x_t, t, c, mask = inputs(C=cfg.model.in_channels, T=29)
    with torch.no_grad():
        out = model.eval()(x_t, t, c, mask)
    io = {"x_t": x_t, "t": t, "c": c, "mask": mask, "out": out.contiguous()}
    save_file(io, str(tmp_path / "io.safetensors"))
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file
        from jat.checkpoint.load import load_model
        io = load_file({str(tmp_path / "io.safetensors")!r})
        model, cfg, base = load_model({str(base_dir)!r}, {str(adapter)!r})
        assert cfg.lora.mode == "qlora" and cfg.lora.temporal_adapter
        with torch.no_grad():
            out = model(io["x_t"], io["t"], io["c"], io["mask"])
        sys.exit(0 if torch.equal(out, io["out"]) else 3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- merging -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,temporal", [("lora", False), ("qlora", False), ("qlora", True)])
def test_merged_model_matches_adapter_model(mode, temporal):
    model = apply_lora(tiny_base(), lcfg(mode, temporal))
    randomize_adapters(model, scale=0.1)
    args = inputs()
    with torch.no_grad():
        out = model(*args)
        merged = merge_lora(copy.deepcopy(model))
        assert not any(isinstance(m, LoRALinear) or is_quantized(m) for m in merged.modules())
        assert all(type(m) is nn.Linear for n, m in merged.named_modules() if "Linear" in type(m).__name__)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in merged.parameters())
        out_m = merged(*args)
        delta = (out - tiny_base()(*args)).norm()
    assert delta > 0.05 * out.norm()  # the adapters matter...
    assert (out_m - out).norm() / out.norm() < 1e-3  # ...and the merge reproduces them
    if not temporal:  # a plain JaT: loads into a freshly built one
        plain = JaT(merged.cfg)
        plain.load_state_dict(merged.state_dict())


def test_merge_checkpoint_loads_as_plain_checkpoint(tmp_path):
    base_dir, cfg = _write_base_checkpoint(tmp_path / "base")
    lora = lcfg("qlora")
    model, _, _ = load_model(base_dir)
    apply_lora(model, lora)
    randomize_adapters(model, scale=0.1)
    adapter = save_adapter(tmp_path / "a.safetensors", model, lora)
    out_dir = tmp_path / "merged"
    cmd = [sys.executable, "scripts/merge_lora.py", "--checkpoint", str(base_dir), "--adapter", str(adapter),
           "--out", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(ValueError, match="no adapter"):
        merge_checkpoint(base_dir, tmp_path / "nothing")
    merged_cfg = ckpt.read_config(out_dir)
    assert merged_cfg.lora.mode == "none" and merged_cfg.model == cfg.model
    plain = JaT(merged_cfg.model)
    plain.load_state_dict(ckpt.load_weights(out_dir, "ema"))  # strict: a plain JaT
    stored = load_file(str(out_dir / "weights.safetensors"))
    assert not [k for k in stored if any(w in k for w in QUANT_WORDS) or "lora_" in k]
    args = inputs(C=512, T=21)
    with torch.no_grad():
        a, b = model.eval()(*args), plain.eval()(*args)
    assert (a - b).norm() / a.norm() < 1e-3


# --- fine-tuning -------------------------------------------------------------------------------


def test_tiny_qlora_finetune_lowers_validation_loss_on_new_clip():
    torch.manual_seed(0)
    model = apply_lora(tiny_base(), LoraConfig(mode="qlora", rank=8, alpha=16.0))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not is_adapter_key(k)}
    g = torch.Generator().manual_seed(5)
    T = 48
    x = torch.randn(1, 8, T, generator=g).cumsum(-1)  # the new clip: a smooth latent sequence...
    x = (x - x.mean()) / x.std()
    c = F.avg_pool1d(x, 7, stride=1, padding=3)  # ...and its blurred, low-resolution condition
    flow = FlowMatching(FlowConfig(cond_dropout=0.0))
    xv, cv = x.expand(16, -1, -1), c.expand(16, -1, -1)
    val_noise = flow.draw(xv, torch.Generator().manual_seed(99))

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return flow.loss(model, xv, cv, noise=val_noise)[0].item()

    before = val_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    train_g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(40):
        loss, _ = flow.loss(model, x.expand(8, -1, -1), c.expand(8, -1, -1), generator=train_g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < 0.8 * before, (before, after)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())


# --- the trainer in LoRA mode ----------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_qlora_finetune_checkpoint_resume_and_inference(tmp_path, caplog):
    base_dir, _ = _write_base_checkpoint(tmp_path / "base")
    lora = {"lora.mode": "qlora", "lora.rank": 4, "lora.alpha": 8, "lora.temporal_adapter": "true",
            "lora.temporal_dim": 16, "train.init_from": str(base_dir)}
    caplog.set_level("INFO")
    trainer = tiny_trainer(tmp_path / "run", 4, 4, **lora)
    trainer.fit()
    assert "trainable" in caplog.text and "frozen weights hold" in caplog.text
    model = trainer.acc.unwrap_model(trainer.model)
    # the base stayed frozen: identical to a fresh quantization of the base checkpoint
    fresh, _, _ = load_model(base_dir)
    apply_lora(fresh, trainer.cfg.lora)
    fresh_state = fresh.state_dict()
    assert all(torch.equal(v, fresh_state[k]) for k, v in model.state_dict().items() if not is_adapter_key(k))

    last = tmp_path / "run" / "ckpt-00000004"
    stored = load_file(str(last / "weights.safetensors"))
    adapter_keys = set(adapter_state_dict(model))
    assert {k.split(".", 1)[1] for k in stored if k.startswith(("model.", "ema."))} == adapter_keys
    adapter_file = last / "adapter.safetensors"
    assert adapter_file.stat().st_size < 0.05 * (base_dir / "weights.safetensors").stat().st_size
    assert set(load_adapter_file(adapter_file)[0]) == adapter_keys

    # resume from step 3 reproduces the uninterrupted run's adapter exactly
    resumed = tiny_trainer(tmp_path / "run", 4, 4, resume=str(tmp_path / "run" / "ckpt-00000003"), **lora)
    resumed.fit()
    final = adapter_state_dict(resumed.acc.unwrap_model(resumed.model))
    assert all(torch.equal(v, final[k]) for k, v in adapter_state_dict(model).items())

    # inference from the LoRA checkpoint alone (base from train.init_from) = the trainer's EMA model
    infer, cfg, norm_from = load_model(last)
    assert cfg.lora.mode == "qlora" and norm_from == base_dir
    args = inputs(C=512, T=24)
    with torch.no_grad():
        assert torch.equal(infer(*args), trainer.ema_model()(*args))

    # both the adapter file and the checkpoint record their base's identity: another base at
    # train.init_from's path (same shapes) is refused
    identity = ckpt.weights_sha256(base_dir)
    assert load_adapter_file(adapter_file).base_sha256 == identity == load_adapter_file(last).base_sha256
    _write_base_checkpoint(tmp_path / "base", seed=1)
    with pytest.raises(ckpt.CheckpointError, match=f"{last}: adapter trained on another base"):
        load_model(last)


@pytest.mark.slow
def test_upsampler_loads_base_plus_adapter(tmp_path):
    from jat.infer.upsampler import Upsampler

    base_dir, _, model, adapter = _adapted_base(tmp_path, seed=4)
    up = Upsampler.from_checkpoint(base_dir, device="cpu", adapter=adapter, precision="fp32")
    args = inputs(C=512, T=21)
    with torch.no_grad():
        assert torch.equal(up.model(*args), model.eval()(*args))
    res = up.upsample(0.1 * torch.randn(1, 16000), 16000, steps=2)
    assert res.audio.shape == (1, 44100) and torch.isfinite(res.audio).all()


# --- integrity: checksums, base identity, files that are no adapter ---------------------------------


def test_flipped_byte_in_adapter_file_is_refused(tmp_path):
    model = apply_lora(tiny_base(), lcfg("lora"))
    randomize_adapters(model)
    path = save_adapter(tmp_path / "adapter.safetensors", model, lcfg("lora"))
    flip_byte(path, sorted(adapter_state_dict(model))[0])
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: checksum mismatch: the file is corrupt"):
        load_adapter_file(path)
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: checksum mismatch"):
        apply_adapter_file(tiny_base(), path)


def test_adapter_is_refused_on_another_base_of_the_same_shapes(tmp_path, caplog):
    base_a, _, model, adapter = _adapted_base(tmp_path, seed=7)
    base_b, _ = _write_base_checkpoint(tmp_path / "other", seed=1)  # same config, other weights
    id_a, id_b = ckpt.weights_sha256(base_a), ckpt.weights_sha256(base_b)
    assert id_a and id_b and id_a != id_b
    assert load_adapter_file(adapter).base_sha256 == id_a  # recorded at save
    with pytest.raises(ckpt.CheckpointError) as err:
        load_model(base_b, adapter)
    assert str(err.value) == (f"{adapter}: adapter trained on another base: it records base {base_a} "
                              f"(sha256 {id_a[:16]}...), not {base_b} (sha256 {id_b[:16]}...); give the base "
                              "it was trained on, or force it (force=True, infer.py --force-adapter, "
                              "merge_lora.py --force)")
    caplog.set_level("WARNING")
    forced, _, _ = load_model(base_b, adapter, force=True)
    assert "applied anyway (forced)" in caplog.text
    own, _, _ = load_model(base_a, adapter)  # its own base: accepted
    args = inputs(C=512, T=21)
    with torch.no_grad():
        assert torch.equal(own(*args), model.eval()(*args))
    # the export script refuses too, with the same one-line message, and writes nothing
    cmd = [sys.executable, "scripts/merge_lora.py", "--checkpoint", str(base_b), "--adapter", str(adapter),
           "--out", str(tmp_path / "merged")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {err.value}"
    assert not (tmp_path / "merged").exists()
    forced_dir = merge_checkpoint(base_b, tmp_path / "forced", adapter, force=True)
    assert (forced_dir / "weights.safetensors").is_file()
    # the upsampler takes the same refusal and the same way past it
    from jat.infer.upsampler import Upsampler

    with pytest.raises(ckpt.CheckpointError, match="adapter trained on another base"):
        Upsampler.from_checkpoint(base_b, device="cpu", adapter=adapter, precision="fp32")
    up = Upsampler.from_checkpoint(base_b, device="cpu", adapter=adapter, force_adapter=True,
                                   precision="fp32")
    with torch.no_grad():
        assert torch.equal(up.model(*args), forced.eval()(*args))


def test_a_file_that_is_no_adapter_is_a_checkpoint_error(tmp_path):
    import soundfile as sf

    base_dir, _ = _write_base_checkpoint(tmp_path / "base")
    wav = tmp_path / "some.wav"
    sf.write(wav, torch.zeros(1000).numpy(), 16000)
    with pytest.raises(ckpt.CheckpointError, match=f"^{wav}: not an adapter file \\(.+\\)$"):
        load_model(base_dir, wav)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ckpt.CheckpointError, match=f"^{other}: not an adapter file \\(format None, "
                                                   "expected 'jat-lora-1'\\)$"):
        load_adapter_file(other)


def test_qlora_without_bitsandbytes_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match=r"pip install 'jat-audiosr\[qlora\]'"):
        quantize_linear(nn.Linear(8, 4))
    plain = nn.Linear(8, 4)
    assert torch.equal(dequantize_weight(plain), plain.weight.detach())  # plain weights need none
