"""Evaluation: degrade HR files at fixed cutoffs with a recorded protocol, upsample, score.

`score_clip` is the one scoring path: evaluation, in-training validation (jat/train/validation.py) and the
overfit check (jat/train/overfit.py) all go through it. It runs the shipped windowed path once,
`Upsampler.upsample(..., lfr=False)`, applies the low-frequency replacement itself, and scores:

* the output with low-frequency replacement (what users get: the headline figures),
* the output's band below the cutoff *without* it (`lsd_lf_no_lfr`: does the network itself keep
  what it was given?),
* the sinc-resampled input and the noise fill (jat/evaluation/baselines.py), the baseline that matters.

Every model figure stands beside the same figure for both baselines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import AudioError, load_audio
from jat.data.degrade import EVAL_FILTER, apply_degradation, eval_degradation
from jat.evaluation.baselines import noise_fill
from jat.evaluation.metrics import (
    PAIR_METRICS,
    WHO,
    OctaveError,
    evaluate_pair,
    lsd_split,
    octave_energy_error,
)
from jat.infer.band import low_frequency_replace
from jat.infer.upsampler import Upsampler

log = logging.getLogger(__name__)

PROTOCOL = {"filter": EVAL_FILTER[0], "order": EVAL_FILTER[1], "phase": "zero (sosfiltfilt)",
            "resampler": "torchaudio sinc (Kaiser), through 2 x cutoff rounded up to 100 Hz",
            "channels": "each channel scored separately, then averaged", "sample_rate": SAMPLE_RATE,
            "inference": "Upsampler.upsample (windows), then jat.infer.band.low_frequency_replace; "
                         "lsd_lf_no_lfr scores the same output before the replacement",
            "baselines": "sinc: the LR input; fill: jat.evaluation.baselines.noise_fill (seeded)"}
# per-row float figures that are averaged: model and baselines side by side, then the model's extras
METRICS = tuple(f"{m}_{who}" for m in PAIR_METRICS for who in WHO) + ("lsd_lf_no_lfr", "rtf")


@dataclass
class ClipScore:
    """One scored clip: the figures (`evaluate_pair` keys + lsd_lf_no_lfr, rtf) and the signals."""

    metrics: dict[str, float]
    output: torch.Tensor  # [C, L] with low-frequency replacement (the shipped output)
    raw: torch.Tensor  # [C, L] the same output before the replacement
    fill: torch.Tensor  # [C, L] the noise-fill baseline
    octaves: dict[str, OctaveError]  # per-octave energy errors for model, sinc, fill


def score_clip(up: Upsampler, hr: torch.Tensor, lr: torch.Tensor, cutoff: float, *,
               steps: int | None = None, seed: int = 0) -> ClipScore:
    """Upsample lr [C, L] (LR audio already at 44.1 kHz, cut at `cutoff` Hz) once and score it
    against hr [C, L]; the noise fill uses the same seed."""
    cut = min(float(cutoff), SAMPLE_RATE / 2)
    tic = time.perf_counter()
    res = up.upsample(lr, SAMPLE_RATE, cutoff=cut, lfr=False, steps=steps, seed=seed)
    raw = res.audio  # [C, L]
    out = low_frequency_replace(raw.clone(), res.input, cut)  # [C, L] what lfr=True returns
    elapsed = time.perf_counter() - tic
    fill = noise_fill(lr, cut, SAMPLE_RATE, seed=seed)  # [C, L]
    metrics = evaluate_pair(out, hr, lr, cut, SAMPLE_RATE, fill=fill)
    metrics["lsd_lf_no_lfr"] = lsd_split(raw, hr, cut, SAMPLE_RATE)["lsd_lf"]
    metrics["rtf"] = elapsed / (hr.shape[-1] / SAMPLE_RATE)
    octaves = {who: octave_energy_error(x, hr, cut, SAMPLE_RATE)
               for who, x in zip(WHO, (out, lr, fill), strict=True)}
    return ClipScore(metrics, out, raw, fill, octaves)


def evaluate(up: Upsampler, files: Sequence[str | Path], cutoffs: Sequence[float], steps: int | None = None,
             seed: int = 0, max_seconds: float | None = None, *, categories: Sequence[str] | None = None,
             degradation: str = "lowpass", progress: Callable[[str], None] | None = None) -> dict:
    """Score `up` on every (file, cutoff); returns {protocol, rows, aggregate, skipped}.

    `categories` (one name per file, e.g. 'speech', 'music') adds per-category aggregates.
    `degradation`: what is done to the HR after the protocol's low-pass (`jat.data.degrade.eval_degradation`:
    'lowpass' alone, or e.g. 'mp3-64', 'vorbis-q2', 'noise-30', 'holes', 'mp3-128+noise-40'); the noise
    and holes of file k are drawn from seed + k. Each row records its degradation (`Degradation.record`);
    figures are still split at the low-pass cutoff.

    Under several processes (`accelerate launch`) every process calls it (a collective): process r
    scores files r, r + N, r + 2N, ..., the rows are gathered in file order, and every process returns
    what one process would have (each file's noise comes from its index, not its process; only the
    timing figure rtf differs from run to run).
    """
    if categories is not None and len(categories) != len(files):
        raise ValueError(f"{len(categories)} categories for {len(files)} files")
    eval_degradation(degradation, 8000.0, 1.0)  # a bad spec fails before any work
    state = PartialState()
    mine = [(k, *_score_file(up, files[k], k, cutoffs, steps, seed, max_seconds, degradation,
                             None if categories is None else categories[k], progress))
            for k in range(state.process_index, len(files), state.num_processes)]
    done = sorted(gather_object(mine) if state.num_processes > 1 else mine, key=lambda part: part[0])
    rows = [row for _, file_rows, _ in done for row in file_rows]
    skipped = {str(files[k]): reason for k, _, reason in done if reason is not None}
    protocol = {**PROTOCOL, "degradation": degradation, "cutoffs": list(map(float, cutoffs)), "steps": steps,
                "seed": seed}
    return {"protocol": protocol, "rows": rows, "aggregate": aggregate(rows),
            "octave_medians": octave_medians(rows), "skipped": skipped}


def _score_file(up: Upsampler, path: str | Path, k: int, cutoffs: Sequence[float], steps: int | None,
                seed: int, max_seconds: float | None, degradation: str, category: str | None,
                progress: Callable[[str], None] | None) -> tuple[list[dict], str | None]:
    """File k's rows, one per cutoff, and None; or no rows and why the file was skipped. Its figures
    depend on k (its degradation is drawn from seed + k), never on which process scores it."""
    try:
        hr = load_audio(path, SAMPLE_RATE)  # [C, L]
    except AudioError as exc:
        log.warning("%s", exc)
        return [], str(exc)
    if max_seconds:
        hr = hr[:, : round(max_seconds * SAMPLE_RATE)]
    rows = []
    for cutoff in cutoffs:
        deg = eval_degradation(degradation, float(cutoff), hr.shape[-1] / SAMPLE_RATE, seed + k)
        lr = apply_degradation(hr, SAMPLE_RATE, deg)  # [C, L]
        score = score_clip(up, hr, lr, float(cutoff), steps=steps, seed=seed)
        m = score.metrics
        row = {"file": str(path), "cutoff": float(cutoff), "degradation": deg.record(),
               "seconds": hr.shape[-1] / SAMPLE_RATE, **m,
               "octaves": {"bands": score.octaves["model"].bands,
                           **{who: o.db for who, o in score.octaves.items()}}}
        if category is not None:
            row["category"] = category
        rows.append(row)
        if progress:
            progress(f"{Path(path).name} @ {cutoff:g} Hz: LSD-HF {m['lsd_hf_model']:.3f} "
                     f"(sinc {m['lsd_hf_sinc']:.3f}, noise fill {m['lsd_hf_fill']:.3f})")
    return rows, None


def aggregate(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric over all rows ('all'), per cutoff ('8000'), and where rows carry a
    category, per category ('speech') and, with several cutoffs, per category and cutoff ('speech@8000')."""
    groups: dict[str, list[dict]] = {"all": rows}
    for r in rows:
        groups.setdefault(f"{r['cutoff']:g}", []).append(r)
    for r in rows:
        if r.get("category") is not None:
            groups.setdefault(str(r["category"]), []).append(r)
    if len({r["cutoff"] for r in rows}) > 1:  # with one cutoff these would repeat the categories
        for r in rows:
            if r.get("category") is not None:
                groups.setdefault(f"{r['category']}@{r['cutoff']:g}", []).append(r)
    out = {}
    for name, group in groups.items():
        if group:
            out[name] = {k: float(np.mean([g[k] for g in group])) for k in METRICS} | {"n": len(group)}
    return out


def octave_medians(rows: list[dict]) -> dict[str, dict]:
    """The energy error per octave above the cutoff (dB, signed), median over the rows, for the model
    and the noise fill, per cutoff ('8000') and per category and cutoff ('speech@8000'): octaves only
    line up between rows of one cutoff. {group: {bands, model, fill, n}}; a median within +-3 dB is
    what "the energy per octave is right" means in the quality targets (docs/quality.md)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['cutoff']:g}", []).append(r)
        if r.get("category") is not None:
            groups.setdefault(f"{r['category']}@{r['cutoff']:g}", []).append(r)
    return {name: {"bands": group[0]["octaves"]["bands"], "n": len(group),
                   **{who: np.median([g["octaves"][who] for g in group], axis=0).tolist()
                      for who in ("model", "fill")}}
            for name, group in groups.items()}


# (label, model key, sinc key, fill key): what markdown_table shows per group
TABLE_ROWS = (("LSD-HF", "lsd_hf_model", "lsd_hf_sinc", "lsd_hf_fill"),
              ("LSD-LF (with LFR)", "lsd_lf_model", "lsd_lf_sinc", "lsd_lf_fill"),
              ("LSD-LF (no LFR)", "lsd_lf_no_lfr", "lsd_lf_sinc", "lsd_lf_fill"),
              ("octave error (dB)", "octave_err_model", "octave_err_sinc", "octave_err_fill"),
              ("SI-SDR (dB)", "si_sdr_model", "si_sdr_sinc", "si_sdr_fill"))


def markdown_table(result: dict) -> str:
    """Aggregate table: per group, model | sinc | noise fill side by side for each metric.

    Lower is better for the LSDs and the octave error (mean |dB| per octave above the cutoff),
    higher for SI-SDR. Both LSD-LF rows compare against the same baselines.
    """
    lines = ["| group | n | metric | model | sinc | noise fill |", "|---|---|---|---|---|---|"]
    for name, agg in result["aggregate"].items():
        for label, *keys in TABLE_ROWS:
            cells = " | ".join(f"{agg[k]:.3f}" for k in keys)
            lines.append(f"| {name} | {agg['n']} | {label} | {cells} |")
    medians = result.get("octave_medians", {})
    if medians:
        lines += ["", "Energy error per octave above the cutoff, dB, median over clips: model (noise fill)",
                  "",
                  "| set | n | octaves from the cutoff up | within 3 dB |", "|---|---|---|---|"]
        for name, m in medians.items():
            cells = ", ".join(f"{a:+.1f} ({b:+.1f})" for a, b in zip(m["model"], m["fill"], strict=True))
            within = sum(abs(a) <= 3 for a in m["model"])
            lines.append(f"| {name} | {m['n']} | {cells} | {within} of {len(m['model'])} |")
    return "\n".join(lines)


__all__ = ["METRICS", "PROTOCOL", "ClipScore", "aggregate", "evaluate", "markdown_table", "octave_medians",
           "score_clip"]
