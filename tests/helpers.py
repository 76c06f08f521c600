"""Helpers shared by several test files (fixtures live in conftest.py).

A plain module, not a test file: pytest puts tests/ on sys.path (tests/ has no __init__.py, so its
default "prepend" import mode inserts the test files' folder), so test files `import helpers`.
tests/train_worker.py runs as a script from tests/ and imports it the same way; code that runs in a
child process (`python -c ...`) puts tests/ on its own sys.path first (`TESTS`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from jat.checkpoint import store as ckpt
from jat.codecs import LatentNorm
from jat.config import Config

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the repository
WORKER = TESTS / "train_worker.py"
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # for `python ...` children


def without_root_powers() -> list[str]:
    """A command prefix under which file permissions bind: as root, setpriv drops the capabilities that
    let root read and write past them (a chmod'ed file or folder stops nobody else); skip without it."""
    import pytest

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("as root, file permissions bind only without CAP_DAC_OVERRIDE; setpriv is missing")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def ddp_launch(port: int, *worker_args) -> list[str]:
    """The command running train_worker.py as 2 CPU processes under `accelerate launch` (env: DDP_ENV)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(WORKER), *map(str, worker_args)]


DDP_ENV = {**CHILD_ENV, "ACCELERATE_USE_CPU": "1"}


# --- models and checkpoints ----------------------------------------------------------------------------


def trained_like(model: torch.nn.Module, seed: int | None = None, std: float = 0.02) -> torch.nn.Module:
    """Give a fresh JaT the look of a trained one, in place: a new JaT's blocks are the identity (zero
    adaLN gates) and its head outputs zero, which would hide whatever the input, an adapter or a
    kernel does. Every parameter that is all zeros (adaLN, head, biases) is drawn from N(0, std²),
    from `seed`'s own generator, or from the global RNG when seed is None; the others keep their init
    (which came from the global RNG: `trained_jat` builds a reproducible one)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, std, generator=g)
    return model


def trained_jat(cfg, seed: int = 0, std: float = 0.02):
    """A trained-looking JaT of `cfg` (a ModelConfig), the same for the same seed: the global RNG is
    seeded, the JaT built, then trained_like draws its zero parameters from the same stream."""
    from jat.model.dit import JaT

    torch.manual_seed(seed)
    return trained_like(JaT(cfg), std=std)


def make_checkpoint(root: Path, overrides=(), weights_from: Config | None = None) -> Path:
    """A tiny-config checkpoint with trained-looking random weights (so the output depends on the input),
    EMA weights apart from the raw ones, and non-trivial latent statistics; `weights_from`: build the
    weights from another config than the one stored (a checkpoint whose weights do not fit)."""
    cfg = Config.from_yaml(ROOT / "configs" / "tiny.yaml", list(overrides))
    model = trained_jat((weights_from or cfg).model)  # then the global RNG draws the rest
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    raw = {k: v + 0.05 * torch.randn_like(v) for k, v in ema.items()}
    c = cfg.model.in_channels
    norm = LatentNorm(0.01 * torch.randn(c), 1 + 0.1 * torch.rand(c))
    tmp = ckpt.begin_save(root, 1)
    ckpt.write_main(tmp, cfg=cfg, step=1, model=raw, ema=ema, norm=norm.state_dict(),
                    optimizer={"state": {}, "param_groups": []}, state={})
    return ckpt.finish_save(tmp)


def flip_byte(path: Path, key: str) -> None:
    """Change one byte in the stored data of tensor `key` of a safetensors file (its lowest byte: a float
    changes slightly)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8:8 + n])[key]["data_offsets"]
    raw[8 + n + start] ^= 0x01
    path.write_bytes(bytes(raw))


# --- a tiny training run (also train_worker.py's) ----------------------------------------------------------

C, T = 512, 24  # tiny.yaml's latent channels (mdct); frames per example


class RandomLatents(Dataset):
    """Fixed random (x, c) pairs; records which indices this process asked for."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, C, T, generator=g)
        self.c = self.x + 0.5 * torch.randn(n, C, T, generator=g)
        self.seen: list[int] = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return {"x": self.x[i], "c": self.c[i], "mask": torch.ones(T, dtype=torch.bool)}


class FailingLatents(RandomLatents):
    """Raises on its fifth example, as a corrupt file or a bug in one process would."""

    def __getitem__(self, i):
        if len(self.seen) >= 4:
            raise RuntimeError(f"injected failure on rank {os.environ.get('RANK')}")
        return super().__getitem__(i)


def make_config(out: str, batch: int, steps: int, **extra) -> Config:
    """configs/tiny.yaml for a short run into `out`: checkpoints every 3 steps, 2 kept, fp32."""
    return Config.from_yaml(ROOT / "configs" / "tiny.yaml", [
        f"train.output_dir={out}", f"train.batch_size={batch}", f"train.max_steps={steps}",
        "train.ckpt_every=3", "train.log_every=1", "train.keep_last=2", "train.mixed_precision=no",
        "optim.warmup_steps=2", "optim.lr=1e-3", "train.ema_decay=0.9",
        *[f"{k}={v}" for k, v in extra.items()]])


def tiny_trainer(out: Path, batch: int = 2, steps: int = 6, resume: str | None = None, data=None, **extra):
    """A Trainer of make_config's run on RandomLatents (identity latent statistics), seeded."""
    from jat.train.data import prepare
    from jat.train.trainer import Trainer

    torch.manual_seed(0)
    cfg = make_config(str(out), batch, steps, **extra)
    data = RandomLatents() if data is None else data
    return Trainer(cfg, prepare(cfg, data, LatentNorm.identity(C)), resume=resume)


def write_clips(folder: Path, specs=((1.2, 8000, 1), (0.7, 22050, 2), (0.4, 48000, 1))) -> list[Path]:
    """Small clips for pre-encoding tests: (seconds, rate, channels) each, tones plus noise, seeded by
    their position; returns their paths (clip-0.wav, clip-1.wav, ...)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (seconds, sr, channels) in enumerate(specs):
        rng = np.random.default_rng(i)
        t = np.arange(round(seconds * sr)) / sr
        data = np.stack([0.3 * np.sin(2 * np.pi * 150 * (c + 1 + i) * t) + 0.05 * rng.standard_normal(t.size)
                         for c in range(channels)], axis=1)  # [L, channels]
        paths.append(folder / f"clip-{i}.wav")
        sf.write(paths[-1], data.astype(np.float32), sr)
    return paths
