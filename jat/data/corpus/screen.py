"""Screening one audio file: readable, long enough, not silent, sampled fast enough, and full band by
the measured bandwidth (`measure_bandwidth`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from jat.data.corpus.packages import Criteria

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# bandwidth


def measure_bandwidth(
    audio: np.ndarray, sr: int, max_seconds: float = 60.0, ref_band: tuple[float, float] = (200.0, 4000.0),
    ref_percentile: float = 90.0, range_db: float = 70.0,
) -> float:
    """Bandwidth (Hz) of audio [C, L] (or [L]) at `sr`: the highest frequency whose power is within
    `range_db` of the reference level.

    Welch PSD (Hann, nperseg = min(4096, L)) of the mono mix of the first `max_seconds`; the reference
    is the `ref_percentile` percentile of the PSD in dB over `ref_band`. White noise reads sr / 2; a
    steep low-pass reads just above its corner (where its stop band has fallen `range_db`).
    Meaningless for digital silence (reads sr / 2): screen that out first.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)  # [L] mono mix
    x = x[: max(1, int(max_seconds * sr))]
    if x.size < 2:
        raise ValueError(f"need at least 2 samples to measure a bandwidth, got {x.size}")
    freqs, psd = scipy.signal.welch(x, fs=sr, nperseg=min(4096, x.size))  # [F], [F]
    level = 10.0 * np.log10(psd + 1e-30)  # [F] dB
    band = (freqs >= ref_band[0]) & (freqs <= ref_band[1])
    reference = np.percentile(level[band] if band.any() else level, ref_percentile)
    within = np.flatnonzero(level >= reference - range_db)
    return float(freqs[within[-1]])


# ---------------------------------------------------------------------------------------------------
# screening one file


@dataclass
class FileResult:
    """What happened to one audio file of a package. path: inside the package (POSIX)."""

    path: str
    category: str | None
    status: str  # "kept" or a key of REASONS
    detail: str = ""
    seconds: float = 0.0
    sample_rate: int = 0
    channels: int = 0
    bandwidth: float | None = None  # Hz, when measured
    size: int = 0  # bytes


def _read_info(path: Path) -> tuple[int, int, int] | str:
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile raises several types for malformed files
        return f"{type(exc).__name__}: {exc}"
    if info.samplerate <= 0 or info.frames <= 0 or info.channels <= 0:
        return f"no samples (rate {info.samplerate}, {info.frames} frames, {info.channels} channels)"
    return int(info.samplerate), int(info.channels), int(info.frames)


def _decode(path: Path, keep_frames: int, block: int = 1 << 18) -> tuple[float, np.ndarray] | str:
    """(peak |sample| over the whole file, the first `keep_frames` frames [C, l]) or why decoding failed."""
    peak, head, have = 0.0, [], 0
    try:
        with sf.SoundFile(str(path)) as f:
            for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):  # [b, C]
                if not np.isfinite(data).all():
                    return f"{int((~np.isfinite(data)).sum())} NaN/Inf samples"
                if data.size:
                    peak = max(peak, float(np.abs(data).max()))
                if have < keep_frames:
                    head.append(data[: keep_frames - have])
                    have += len(head[-1])
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if not head:
        return "no samples"
    return peak, np.concatenate(head).T  # [C, l]


def screen_file(path: Path, criteria: Criteria) -> FileResult:
    """Screen one audio file (path and category left blank): unreadable, low sample rate, too short,
    silent, band-limited, else kept. The whole file is decoded (a corrupt tail is unreadable)."""
    result = FileResult(path="", category=None, status="kept")
    info = _read_info(path)
    if isinstance(info, str):
        result.status, result.detail = "unreadable", info
        return result
    sr, channels, frames = info
    result.sample_rate, result.channels, result.seconds = sr, channels, frames / sr
    if sr < criteria.min_sample_rate:
        result.status, result.detail = "low_sample_rate", f"{sr} Hz < {criteria.min_sample_rate} Hz"
        return result
    if result.seconds < criteria.min_seconds:
        result.status, result.detail = "too_short", f"{result.seconds:.3f} s < {criteria.min_seconds} s"
        return result
    decoded = _decode(path, max(2, int(criteria.bandwidth_seconds * sr)))
    if isinstance(decoded, str):
        result.status, result.detail = "unreadable", decoded
        return result
    peak, head = decoded
    if peak < criteria.silence_peak:
        result.status, result.detail = "silent", f"peak {peak:.2e} < {criteria.silence_peak:.0e}"
        return result
    result.bandwidth = round(measure_bandwidth(head, sr, max_seconds=criteria.bandwidth_seconds), 1)
    if result.bandwidth < criteria.min_bandwidth:
        result.status = "band_limited"
        result.detail = f"{result.bandwidth:.0f} Hz < {criteria.min_bandwidth:.0f} Hz"
    return result
