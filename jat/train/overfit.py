"""The overfit check: memorise one clip's (LR, HR) latent pair, then upsample that LR clip.

It proves a set-up learns: the output must approach the codec's own reconstruction of the HR clip
(the ceiling) and beat, by a wide margin, both the sinc-resampled LR input and the noise fill
(jat/evaluation/baselines.py; the baseline that matters). The clip is scored through the same path as
evaluation and validation, `jat.evaluation.evaluate.score_clip`; metrics holds its keys (see
jat/evaluation/metrics.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from jat.atomic import write_atomic
from jat.codecs import LatentStats, build_codec
from jat.codecs.base import SAMPLE_RATE
from jat.codecs.latent import LatentSpace
from jat.config import Config
from jat.data.audio import level_gain
from jat.evaluation.evaluate import score_clip
from jat.evaluation.metrics import lsd
from jat.infer.upsampler import Upsampler
from jat.train.data import TrainingData
from jat.train.trainer import Trainer
from jat.train.validation import make_clip

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
    output: torch.Tensor  # [1, L] with low-frequency replacement
    fill: torch.Tensor  # [1, L] the noise-fill baseline
    ceiling: torch.Tensor  # [1, L] codec reconstruction of hr
    losses: list[float]


def overfit_clip(cfg: Config, hr: torch.Tensor, cutoff: float = 8000.0, seed: int = 0) -> OverfitResult:
    """Train `cfg` on one mono clip hr [1, L] (44.1 kHz) degraded at `cutoff`; score the result."""
    clip = make_clip("clip", hr, cutoff)
    codec = build_codec(cfg.codec)
    # the pair is memorised at the level the upsampler brings its input to (`level_gain`): trained at
    # the clip's own level, the memorised band would come back off by the gain (+4.4 dB on the demo)
    gain = float(level_gain(clip.lr)[0]) or 1.0
    with torch.no_grad():
        x = codec.encode(clip.hr[None] * gain)[0]  # [C, T]
        c = codec.encode(clip.lr[None] * gain)[0]  # [C, T]
        ceiling = codec.decode(codec.encode(clip.hr[None]), length=hr.shape[-1])[0]  # [1, L]
    stats = LatentStats(x.shape[0])
    stats.update(x[None])
    latents = LatentSpace(codec, stats.finalize())
    data = TrainingData(RepeatedPair(x, c, n=cfg.train.batch_size * 64), latents)
    # no in-training validator: the clip is sampled and scored once, below, after training
    trainer = Trainer(cfg, data)
    trainer.fit()

    # one window covering the clip: the model was trained on the whole clip's latent sequence
    up = Upsampler(trainer.ema_model(), trainer.latents, trainer.flow, trainer.acc.device,
                   window_seconds=hr.shape[-1] / SAMPLE_RATE + 1.0)
    score = score_clip(up, clip.hr, clip.lr, cutoff, steps=cfg.flow.steps, seed=seed)
    out = score.output  # [1, L]
    metrics = dict(score.metrics)
    metrics["lsd_vs_ceiling"] = lsd(out, ceiling)
    metrics["lsd_ceiling"] = lsd(ceiling, clip.hr)
    metrics["final_loss"] = float(sum(trainer.history[-20:]) / len(trainer.history[-20:]))
    metrics["first_loss"] = float(sum(trainer.history[:20]) / len(trainer.history[:20]))
    return OverfitResult(metrics, clip.hr, clip.lr, out, score.fill, ceiling, trainer.history)


def write_report(result: OverfitResult, out_dir, names: dict[str, str] | None = None) -> dict[str, str]:
    """Write input_lr.wav, noise_fill.wav, upsampled.wav, reference.wav, spectrogram.png and
    metrics.json to `out_dir`."""
    from jat.data.audio import save_audio
    from jat.evaluation.plots import spectrogram_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"input": out / "input_lr.wav", "noise_fill": out / "noise_fill.wav",
             "output": out / "upsampled.wav", "reference": out / "reference.wav",
             "spectrogram": out / "spectrogram.png", "metrics": out / "metrics.json"}
    save_audio(files["input"], result.lr, SAMPLE_RATE)
    save_audio(files["noise_fill"], result.fill.clamp(-1, 1), SAMPLE_RATE)
    save_audio(files["output"], result.output.clamp(-1, 1), SAMPLE_RATE)
    save_audio(files["reference"], result.hr, SAMPLE_RATE)
    spectrogram_figure({"input (LR)": result.lr, "noise fill": result.fill, "output": result.output,
                        "reference (HR)": result.hr}, SAMPLE_RATE, files["spectrogram"])
    write_atomic(files["metrics"], lambda tmp: tmp.write_text(json.dumps(result.metrics, indent=2) + "\n"))
    return {k: str(v) for k, v in files.items()}


def format_metrics(m: dict[str, float]) -> str:
    """The overfit report as a small table: model | sinc | noise fill."""
    rows = [("LSD (full band)", "lsd"), ("LSD above cutoff", "lsd_hf"), ("LSD below cutoff", "lsd_lf"),
            ("octave error (dB)", "octave_err"), ("SI-SDR (dB)", "si_sdr")]
    lines = [f"{'metric':<20}{'model':>10}{'sinc':>10}{'noise fill':>12}"]
    lines += [f"{name:<20}{m[f'{k}_model']:>10.3f}{m[f'{k}_sinc']:>10.3f}{m[f'{k}_fill']:>12.3f}"
              for name, k in rows]
    lines.append(f"{'  ... without LFR':<20}{m['lsd_lf_no_lfr']:>10.3f}   (LSD below cutoff, network alone)")
    lines.append(f"{'LSD vs codec recon':<20}{m['lsd_vs_ceiling']:>10.3f}"
                 f"   (codec ceiling LSD {m['lsd_ceiling']:.3f})")
    lines.append(f"real-time factor {m['rtf']:.3f}, loss {m['first_loss']:.3g} -> {m['final_loss']:.3g}")
    return "\n".join(lines)
