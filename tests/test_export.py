"""Inference folders (jat-export), Hub loading (hf://, from_pretrained; offline, from a local Hub cache
made here) and the installed package (a wheel's console commands and configs, outside the repository)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import ROOT, make_checkpoint

from jat.checkpoint import store as ckpt
from jat.checkpoint.export import export_inference
from jat.checkpoint.hub import is_hub_name
from jat.checkpoint.store import resolve_checkpoint
from jat.cli import infer
from jat.cli.export import main as export_main
from jat.data.synth import demo_clip
from jat.infer.upsampler import Upsampler

COMMANDS = ("jat-train", "jat-infer", "jat-eval", "jat-precompute", "jat-bench", "jat-corpus", "jat-overfit",
            "jat-demo", "jat-merge", "jat-model-info", "jat-export", "jat-web", "jat-fit-envelope")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _upsample(up: Upsampler) -> torch.Tensor:
    x = torch.from_numpy(demo_clip(1.0, 16000, seed=4))[None]  # [1, L] at 16 kHz
    return up.upsample(x, 16000, steps=3, seed=2).audio


def test_export_keeps_the_ema_weights_alone_and_upsamples_identically(checkpoint, tmp_path):
    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(checkpoint.parent), "--out", str(out)]) == 0  # a run folder
    record = json.loads((out / "export.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "weights.safetensors"]
    groups = {k.split(".")[0] for k, _ in ckpt.read_tensors(out / "weights.safetensors")[0].items()}
    assert groups == {"ema", "norm"}  # no raw weights, no optimizer, no RNG
    full = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert record["checkpoint_bytes"] == full and record["bytes"] < 0.55 * full
    assert torch.equal(_upsample(Upsampler.from_pretrained(out, device="cpu", precision="fp32")),
                       _upsample(Upsampler.from_checkpoint(checkpoint, device="cpu", precision="fp32")))
    card = (out / "README.md").read_text()
    assert "| parameters | " in card and f"| trained | {record['step']} steps" in card
    with pytest.raises(ckpt.CheckpointError, match="no 'model' tensors"):  # the raw weights are gone
        Upsampler.from_checkpoint(out, device="cpu", ema=False)


def test_bf16_export_halves_the_weights_and_stays_close(checkpoint, tmp_path):
    fp32 = export_inference(checkpoint, tmp_path / "fp32")
    bf16 = export_inference(checkpoint, tmp_path / "bf16", dtype="bf16")
    norm_bytes = 2 * 4 * 512 + 2000  # the fp32 statistics and the header stay
    assert bf16["bytes"] < 0.5 * fp32["bytes"] + norm_bytes
    a = _upsample(Upsampler.from_pretrained(tmp_path / "fp32", device="cpu", precision="fp32"))
    b = _upsample(Upsampler.from_pretrained(tmp_path / "bf16", device="cpu", precision="fp32"))
    assert not torch.equal(a, b)
    # weights rounded to 8 mantissa bits (relative 2^-9) move a random tiny network's output by a few %
    assert float((a - b).norm() / a.norm()) < 0.1


def _hub_cache(root: Path, repo: str, folder: Path, commit: str = "0123456789abcdef") -> Path:
    """A local Hugging Face cache holding `folder` as revision `main` of model repository `repo`."""
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap


def test_hub_names_load_from_the_hub_cache_offline(checkpoint, tmp_path, monkeypatch):
    export_inference(checkpoint, tmp_path / "exported")
    snap = _hub_cache(tmp_path / "hub", "org/tiny", tmp_path / "exported")
    from huggingface_hub import constants  # read from the environment once, when first imported

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert is_hub_name("hf://org/tiny") and is_hub_name("org/tiny") and not is_hub_name(str(checkpoint))
    want = _upsample(Upsampler.from_checkpoint(tmp_path / "exported", device="cpu", precision="fp32"))
    for name in ("hf://org/tiny", "org/tiny", "hf://org/tiny@main"):
        up = Upsampler.from_pretrained(name, device="cpu", precision="fp32")
        assert up.checkpoint == snap
        assert torch.equal(_upsample(up), want)
    with pytest.raises(ckpt.CheckpointError, match="hf://org/other: not in the local Hub cache"):
        Upsampler.from_checkpoint("hf://org/other", device="cpu")
    # the command line keeps a Hub name as given (a Path would fold hf:// into hf:/)
    wav = tmp_path / "in.wav"
    sf.write(wav, demo_clip(0.5, 16000, seed=1), 16000)
    assert infer.main([str(wav), "--checkpoint", "hf://org/tiny", "--steps", "2", "--device", "cpu"]) == 0
    assert sf.info(str(tmp_path / "in_jat.wav")).samplerate == 44100


def test_checkpoint_arguments_resolve_run_folders_and_keep_everything_else(checkpoint, tmp_path):
    run = checkpoint.parent
    assert resolve_checkpoint(run) == checkpoint  # a run folder: its newest checkpoint
    assert resolve_checkpoint(checkpoint) == checkpoint
    weights = str(checkpoint / "weights.safetensors")
    assert resolve_checkpoint(weights) == weights
    assert resolve_checkpoint("hf://org/name") == "hf://org/name"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_checkpoint(empty) == empty  # no checkpoint: as given, for the loader's own message


@pytest.mark.slow
def test_the_wheel_installs_commands_and_configs_that_work_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True)
    [wheel] = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"jat/configs/{n}.yaml" for n in ("v2", "small", "tiny", "real")} <= set(names)
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import jat, jat.config as c; print(jat.__file__); "
                            "print(c.resolve_config_path('v2.yaml'))"], cwd=outside, env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(target)) and where[1].startswith(str(target))  # not the checkout
    for command in COMMANDS:
        proc = subprocess.run([str(target / "bin" / command), "--help"], cwd=outside, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{command} --help: {proc.stderr[-1500:]}"
        assert "usage:" in proc.stdout


def test_export_with_an_adapter_folds_it_in(checkpoint, tmp_path):
    """Base + LoRA adapter -> an inference folder of plain weights that upsamples as the adapted model."""
    from jat.checkpoint.adapters import save_adapter
    from jat.checkpoint.load import load_model
    from jat.config import LoraConfig
    from jat.model.lora import apply_lora, is_adapter_key

    model, cfg, _ = load_model(checkpoint)
    lora = LoraConfig(mode="lora", rank=4, alpha=8)
    apply_lora(model, lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero adapters: B starts at zero, which would make the check trivial
        for name, p in model.named_parameters():
            if is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    adapter = save_adapter(tmp_path / "adapter.safetensors", model, lora, base=str(checkpoint))
    record = export_inference(checkpoint, tmp_path / "exported", adapter=adapter)
    assert record["adapter"] == str(adapter)
    stored = ckpt.read_config(tmp_path / "exported")
    assert stored.lora.mode == "none" and stored.train.init_from is None
    tensors = ckpt.read_tensors(tmp_path / "exported" / "weights.safetensors")[0]
    assert not [k for k in tensors if "lora_" in k]
    # the network itself: adapted (base + adapter) against folded (export), and against the bare base
    adapted, _, _ = load_model(checkpoint, adapter)
    folded, _, _ = load_model(tmp_path / "exported")
    bare, _, _ = load_model(checkpoint)
    g = torch.Generator().manual_seed(5)
    C = cfg.model.in_channels
    x_t, c = torch.randn(2, C, 24, generator=g), torch.randn(2, C, 24, generator=g)  # [B, C, T]
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        want, got, base = adapted(x_t, t, c), folded(x_t, t, c), bare(x_t, t, c)
    assert float((want - base).norm() / want.norm()) > 0.01  # the adapter matters...
    # ...and the folded weights reproduce it: W0 + s·BA rounded once in fp32 per weight, a relative error
    # of a few 2^-24 per product, amplified by at most the depth's handful of layers
    assert float((got - want).norm() / want.norm()) < 1e-5
