"""In-training validation: upsample fixed LR clips with the EMA weights through the one scoring path
(`jat.evaluation.evaluate.score_clip`: the shipped windowed upsampler, then low-frequency replacement)
and score
them beside the sinc-resampled input and the noise-fill baseline; log audio and spectrograms to
TensorBoard.

`Validator.__call__` returns the clips' mean figures (see `validation_metrics`): the model's under
plain names (lsd, lsd_hf, lsd_lf, lsd_lf_no_lfr, si_sdr, octave_err, rtf; "lsd" picks the trainer's
best checkpoint), the baselines' with _sinc and _fill, and lsd_baseline (the sinc LSD under its
old name, for readers of older state.json files).

Under several processes (`accelerate launch`) every process runs the validator: process r scores clips
r, r + N, r + 2N, ... and the scores are gathered, so every process returns the figures one process
would have computed (each clip's seed is its index, not its process), while the main process, which
holds the writer, logs the media.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from jat.codecs.base import SAMPLE_RATE
from jat.codecs.latent import LatentSpace
from jat.config import Config
from jat.data.audio import list_audio_files, load_audio
from jat.data.degrade import EVAL_FILTER, Degradation, apply_degradation
from jat.evaluation.evaluate import ClipScore, score_clip
from jat.evaluation.plots import spectrogram_image
from jat.infer.upsampler import Upsampler
from jat.model.flow import FlowMatching

log = logging.getLogger(__name__)


@dataclass
class ValClip:
    name: str
    hr: torch.Tensor  # [1, L]
    lr: torch.Tensor  # [1, L] at 44.1 kHz: also the sinc baseline
    cutoff: float


def make_clip(name: str, hr: torch.Tensor, cutoff: float, family: str = EVAL_FILTER[0],
              order: int = EVAL_FILTER[1]) -> ValClip:
    """A validation clip: HR mono audio [1, L] and its LR version under a fixed, recorded degradation."""
    lr = apply_degradation(hr, SAMPLE_RATE, Degradation(cutoff, family, order))  # [1, L]
    return ValClip(name, hr, torch.as_tensor(lr, dtype=torch.float32), cutoff)


class Validator:
    """Callable the Trainer runs every `val_every` steps: (EMA model, latent space, flow) -> mean metrics."""

    def __init__(self, clips: list[ValClip], steps: int = 16, seed: int = 0, log_media: bool = True,
                 window_seconds: float | None = None):
        if not clips:
            raise ValueError("no validation clips")
        self.clips, self.steps, self.seed, self.log_media = clips, steps, seed, log_media
        self.window_seconds = window_seconds  # the upsampler's windows (None: its default)
        self.last_outputs: list[torch.Tensor] = []
        self.scored_here: list[int] = []  # the clips this process scored in the last call

    @classmethod
    def from_config(cls, cfg: Config) -> Validator | None:
        """Clips from `data.val`: the first `segment_seconds` of the first `val_clips` files (mono)."""
        if not cfg.data.val:
            return None
        seg = round(cfg.data.segment_seconds * SAMPLE_RATE)
        clips = []
        for path in list_audio_files(cfg.data.val)[: cfg.data.val_clips]:
            hr = load_audio(path, SAMPLE_RATE, mono=True)[:, :seg]  # [1, L]
            clips.append(make_clip(Path(path).stem, hr, cfg.data.val_cutoff))
        # a few-step student is scored as it samples (flow.steps, in its trained budgets), not at val_steps
        steps = cfg.flow.steps if cfg.distill.teacher else cfg.train.val_steps
        return cls(clips, steps=steps, seed=cfg.train.seed,
                   window_seconds=cfg.data.segment_seconds)

    def __call__(self, model, latents: LatentSpace, flow: FlowMatching, writer=None, step: int = 0,
                 ) -> dict[str, float]:
        """Score `model` in `latents` with `flow` on every clip through the shipped Upsampler; log the
        first two clips' audio and spectrograms to `writer` (a SummaryWriter) at `step`. Under several
        processes every process calls it (a collective) and gets the same figures."""
        device = next(model.parameters()).device
        up = Upsampler(model, latents, flow, device, window_seconds=self.window_seconds)
        state = PartialState()
        self.scored_here = list(range(state.process_index, len(self.clips), state.num_processes))
        mine = [(i, score_clip(up, self.clips[i].hr, self.clips[i].lr, self.clips[i].cutoff,
                               steps=self.steps, seed=self.seed + i)) for i in self.scored_here]
        scores = dict(gather_object(mine) if state.num_processes > 1 else mine)
        rows, self.last_outputs = [], []
        for i, clip in enumerate(self.clips):
            score = scores[i]
            self.last_outputs.append(score.output)  # [1, L] with low-frequency replacement
            rows.append(score.metrics)
            if self.log_media and writer is not None and i < 2:
                self._log_media(writer, step, clip, score)
        return validation_metrics({k: float(np.mean([r[k] for r in rows])) for k in rows[0]})

    @staticmethod
    def _log_media(writer, step: int, clip: ValClip, score: ClipScore) -> None:
        for kind, audio in (("lr", clip.lr), ("noise_fill", score.fill), ("output", score.output),
                            ("hr", clip.hr)):
            a = audio.reshape(-1).clamp(-1, 1)
            writer.add_audio(f"val_audio/{clip.name}/{kind}", a, step, sample_rate=SAMPLE_RATE)
            writer.add_image(f"val_spec/{clip.name}/{kind}", spectrogram_image(a, SAMPLE_RATE), step,
                             dataformats="HWC")


def validation_metrics(m: dict[str, float]) -> dict[str, float]:
    """`score_clip` figures -> validation keys: the model's without the _model suffix, the rest as
    they are, plus lsd_baseline (= lsd_sinc)."""
    out = {k.removesuffix("_model"): v for k, v in m.items()}
    out["lsd_baseline"] = m["lsd_sinc"]
    return out
