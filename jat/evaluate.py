"""Evaluation: degrade HR files at fixed cutoffs with a recorded protocol, upsample, score.

Every model figure stands beside the same figure for the sinc-resampled LR input (the baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jat.audio import AudioError, load_audio
from jat.band import SR
from jat.degrade import EVAL_FILTER, Degradation, apply_degradation
from jat.inference import Upsampler
from jat.metrics import evaluate_pair

log = logging.getLogger(__name__)

PROTOCOL = {"filter": EVAL_FILTER[0], "order": EVAL_FILTER[1], "phase": "zero (sosfiltfilt)",
            "resampler": "torchaudio sinc (Kaiser), through 2 x cutoff rounded up to 100 Hz",
            "channels": "each channel scored separately, then averaged", "sample_rate": SR}
METRICS = ("lsd", "lsd_hf", "lsd_lf", "si_sdr")


def evaluate(up: Upsampler, files: Sequence[str | Path], cutoffs: Sequence[float], steps: int | None = None,
             seed: int = 0, max_seconds: float | None = None, lfr: bool = True,
             progress: Callable[[str], None] | None = None) -> dict:
    """Score `up` on every (file, cutoff); returns {protocol, rows, aggregate, skipped}."""
    rows, skipped = [], {}
    for path in files:
        try:
            hr = load_audio(path, SR)  # [C, L]
        except AudioError as exc:
            skipped[str(path)] = str(exc)
            log.warning("%s", exc)
            continue
        if max_seconds:
            hr = hr[:, : round(max_seconds * SR)]
        for cutoff in cutoffs:
            deg = Degradation(float(cutoff), PROTOCOL["filter"], PROTOCOL["order"])
            lr = apply_degradation(hr, SR, deg)  # [C, L]
            res = up.upsample(lr, SR, cutoff=float(cutoff), lfr=lfr, steps=steps, seed=seed)
            m = evaluate_pair(res.audio, hr, lr, float(cutoff), SR)
            rows.append({"file": str(path), "cutoff": float(cutoff), "seconds": hr.shape[-1] / SR,
                         "rtf": res.rtf["total"], **m})
            if progress:
                progress(f"{Path(path).name} @ {cutoff:g} Hz: LSD {m['lsd_model']:.3f} "
                         f"(baseline {m['lsd_baseline']:.3f})")
    return {"protocol": {**PROTOCOL, "cutoffs": list(map(float, cutoffs)), "steps": steps, "seed": seed,
                         "low_frequency_replacement": lfr},
            "rows": rows, "aggregate": aggregate(rows), "skipped": skipped}


def aggregate(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric per cutoff and over all rows ('all')."""
    groups: dict[str, list[dict]] = {"all": rows}
    for r in rows:
        groups.setdefault(f"{r['cutoff']:g}", []).append(r)
    out = {}
    for name, group in groups.items():
        if group:
            keys = [f"{m}_{who}" for m in METRICS for who in ("model", "baseline")]
            out[name] = {k: float(np.mean([g[k] for g in group])) for k in keys} | {"n": len(group)}
    return out


def markdown_table(result: dict) -> str:
    """Aggregate table: per cutoff, model vs sinc baseline for each metric."""
    head = "| cutoff | n | " + " | ".join(f"{m} model | {m} baseline" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(METRICS))]
    for name, agg in result["aggregate"].items():
        cells = " | ".join(f"{agg[f'{m}_model']:.3f} | {agg[f'{m}_baseline']:.3f}" for m in METRICS)
        lines.append(f"| {name} | {agg['n']} | {cells} |")
    return "\n".join(lines)


__all__ = ["PROTOCOL", "aggregate", "evaluate", "markdown_table"]
