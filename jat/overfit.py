"""The overfit check: memorise one clip's (LR, HR) latent pair, then upsample that LR clip.

It proves a set-up learns: the output must approach the codec's own reconstruction of the HR clip
(the ceiling) and beat the sinc-resampled LR input (the baseline) by a wide margin.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from jat.band import SR
from jat.codecs import LatentStats, build_codec
from jat.config import Config
from jat.inference import Upsampler
from jat.metrics import evaluate_pair, lsd
from jat.train import Trainer
from jat.validation import make_clip

log = logging.getLogger(__name__)



class RepeatedPair(Dataset):
    """One (x, c) latent pair [C, T], repeated `n` times so every batch holds it."""

    def __init__(self, x: torch.Tensor, c: torch.Tensor, n: int):
        self.x, self.c, self.n = x, c, n
        self.mask = torch.ones(x.shape[-1], dtype=torch.bool)  # [T]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x, "c": self.c, "mask": self.mask}


@dataclass
class OverfitResult:
    metrics: dict[str, float]
    hr: torch.Tensor  # [1, L]
    lr: torch.Tensor  # [1, L]
    output: torch.Tensor  # [1, L]
    ceiling: torch.Tensor  # [1, L] codec reconstruction of hr
    losses: list[float]


def overfit_clip(cfg: Config, hr: torch.Tensor, cutoff: float = 8000.0, seed: int = 0) -> OverfitResult:
    """Train `cfg` on one mono clip hr [1, L] (44.1 kHz) degraded at `cutoff`; score the result."""
    clip = make_clip("clip", hr, cutoff)
    codec = build_codec(cfg.codec)
    with torch.no_grad():
        x = codec.encode(clip.hr[None])[0]  # [C, T]
        c = codec.encode(clip.lr[None])[0]  # [C, T]
        ceiling = codec.decode(x[None], length=hr.shape[-1])[0]  # [1, L]
    stats = LatentStats(x.shape[0])
    stats.update(x[None])
    norm = stats.finalize()
    dataset = RepeatedPair(x, c, n=cfg.train.batch_size * 64)
    # no in-training validator: the clip is sampled and scored once, below, after training
    trainer = Trainer(cfg, dataset=dataset, norm=norm)
    trainer.fit()

    up = Upsampler(trainer.ema_model(), trainer.norm, codec, trainer.flow, trainer.acc.device, cfg)
    tic = time.perf_counter()
    out = up.upsample_44k(clip.lr[None], steps=cfg.flow.steps, seed=seed)[0]  # [1, L]
    rtf = (time.perf_counter() - tic) / (hr.shape[-1] / SR)
    metrics = evaluate_pair(out, clip.hr, clip.lr, cutoff, SR)
    metrics["lsd_vs_ceiling"] = lsd(out, ceiling)
    metrics["lsd_ceiling"] = lsd(ceiling, clip.hr)
    metrics["rtf"] = rtf
    metrics["final_loss"] = float(sum(trainer.history[-20:]) / len(trainer.history[-20:]))
    metrics["first_loss"] = float(sum(trainer.history[:20]) / len(trainer.history[:20]))
    return OverfitResult(metrics, clip.hr, clip.lr, out, ceiling, trainer.history)


def write_report(result: OverfitResult, out_dir, names: dict[str, str] | None = None) -> dict[str, str]:
    """Write input_lr.wav, upsampled.wav, reference.wav, spectrogram.png and metrics.json to `out_dir`."""
    import json
    from pathlib import Path

    from jat.audio import save_audio
    from jat.plots import spectrogram_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"input": out / "input_lr.wav", "output": out / "upsampled.wav",
             "reference": out / "reference.wav", "spectrogram": out / "spectrogram.png",
             "metrics": out / "metrics.json"}
    save_audio(files["input"], result.lr, SR)
    save_audio(files["output"], result.output.clamp(-1, 1), SR)
    save_audio(files["reference"], result.hr, SR)
    spectrogram_figure({"input (LR)": result.lr, "output": result.output, "reference (HR)": result.hr}, SR,
                       files["spectrogram"])
    tmp = files["metrics"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.metrics, indent=2) + "\n")
    tmp.replace(files["metrics"])
    return {k: str(v) for k, v in files.items()}


def format_metrics(m: dict[str, float]) -> str:
    """The overfit report as a small table."""
    rows = [("LSD (full band)", m["lsd_model"], m["lsd_baseline"]),
            ("LSD above cutoff", m["lsd_hf_model"], m["lsd_hf_baseline"]),
            ("LSD below cutoff", m["lsd_lf_model"], m["lsd_lf_baseline"]),
            ("SI-SDR (dB)", m["si_sdr_model"], m["si_sdr_baseline"])]
    lines = [f"{'metric':<20}{'model':>10}{'sinc baseline':>16}"]
    lines += [f"{name:<20}{a:>10.3f}{b:>16.3f}" for name, a, b in rows]
    lines.append(f"{'LSD vs codec recon':<20}{m['lsd_vs_ceiling']:>10.3f}"
                 f"   (codec ceiling LSD {m['lsd_ceiling']:.3f})")
    lines.append(f"real-time factor {m['rtf']:.3f}, loss {m['first_loss']:.3g} -> {m['final_loss']:.3g}")
    return "\n".join(lines)
