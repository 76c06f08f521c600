"""The input's band (docs/design.md section 7): bringing it to 44.1 kHz in chunks, detecting its cutoff
(`detect_cutoff`), and keeping it in the output below that cutoff (low-frequency replacement).

Every function here works through long signals in chunks with enough context that the chunks join
exactly, so memory does not depend on the signal's length beyond its own arrays.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import scipy.signal
import torch

from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import resampled_length
from jat.infer.rates import resample_blocks

log = logging.getLogger(__name__)

LFR_START = 0.9  # low-frequency replacement: input only below LFR_START * cutoff, model only above cutoff
CUTOFF_SECONDS = 30.0  # cutoff detection reads at most this much audio (three excerpts)


def output_length(length: int, sr: int) -> int:
    """Samples at 44.1 kHz for `length` samples at `sr`: ceil(length * SAMPLE_RATE / sr), the same time."""
    return resampled_length(length, sr, SAMPLE_RATE)


def resample_to_44k(audio: torch.Tensor, sr: int, chunk_seconds: float = 30.0) -> torch.Tensor:
    """audio [C, L] at `sr` -> [C, output_length(L, sr)] at 44.1 kHz (`audio.resample`, sinc), in chunks
    of about `chunk_seconds` joined exactly (`jat.infer.rates.resample_blocks`)."""
    return resample_blocks(audio, sr, SAMPLE_RATE, block_seconds=chunk_seconds)


@dataclass(frozen=True)
class BandEstimate:
    """A detected band limit: `cutoff` Hz (sr / 2 when the input reads as full band), `drop_db`, the fall
    across the detected edge (pass-band level just below it minus the highest level anywhere above it;
    for full band, the largest fall found anywhere, below `min_drop`), and `confidence` in [0, 1]:
    0 at no fall, 1 at DROP_SURE dB or more, linear in dB between (the same scale for full band: near 0
    for clean full-band input, higher when something almost looked like an edge)."""

    cutoff: float
    drop_db: float
    confidence: float
    full_band: bool


DROP_SURE = 60.0  # dB: a fall this large across an edge is certain (confidence 1)
SMOOTH_HZ = 300.0  # width of the running percentile across frequency
LOW_PERCENTILE = 20.0  # the percentile that decides whether there is an edge (ignores tonal peaks)
PASS_OCTAVES = 1 / 3  # the pass-band level at f is the median over [f 2^-PASS_OCTAVES, f]
STOP_OCTAVES = 1.0  # an edge must fall by min_drop within this many octaves (or by Nyquist)
KNEE_DB = 1.5  # the pass band is where the third-octave below is at most this much louder (< 9 dB/octave)
CLIFF_RATIO = 1.05  # a fall completed within this ratio of frequencies is a cliff (a resampler's)


def _spectrum(x: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Long-term average spectrum of x [N, L]: frequencies [F] and the Welch power in dB [F]."""
    nperseg = min(4096, x.shape[-1])
    # no per-segment detrending: under the periodic Hann window a segment's mean reaches bins 0 and 1
    # only, which no decision reads (they lie under min_freq); it saves a sixth of the Welch time
    freqs, psd = scipy.signal.welch(x, fs=sr, nperseg=nperseg, detrend=False, axis=-1)  # [F], [N, F]
    power = psd.mean(axis=0)  # [F] channels averaged in power, so anti-phase channels cannot cancel
    return freqs, 10 * np.log10(power + 1e-30)


def band_edge(
    audio: torch.Tensor | np.ndarray, sr: int, min_drop: float = 30.0, min_freq: float = 500.0,
    floor_db: float = 110.0,
) -> BandEstimate:
    """Estimate the band limit of `audio` [..., L] at `sr` from its long-term average spectrum.

    1. Welch spectrum in dB (4096 points, Hann, power-averaged over frames and channels), seen
       through running percentiles across SMOOTH_HZ of frequency: the median (`level`, which keeps
       a step where it is) and the LOW_PERCENTILE-th (`base`, the level between tonal peaks, so a
       tone or a harmonic series over a broadband floor reads as that floor, not as a band). Bins
       more than `floor_db` under the spectral peak are numerical noise and count as that floor.
    2. An edge at f: the spectrum's `base` anywhere above f 2^STOP_OCTAVES (or from Nyquist, when that
       is nearer) stays at least `min_drop` dB under the pass band just below f (the median of
       `base` over [f 2^-PASS_OCTAVES, f]). The band ends at the highest such f; none: full band.
    3. Placement, on `level`: the -3 dB point of the pass band (the last frequency within 3 dB of it,
       the convention of a filter's cutoff), unless the fall to `min_drop` under it is done within a
       factor CLIFF_RATIO of frequency: a cliff, the trace of a resampler or brick-wall filter, whose
       band limit is its stop-band edge, placed halfway (in dB) between the pass band and the highest
       level above the cliff.

    Holds within 3 % for the LR simulation's outputs (every family, orders 2-10, any cutoff) and within
    5 % or 300 Hz for full-rate IIR low-passes that fall `min_drop` dB within an octave
    (tests/test_cutoff.py); a gentler roll-off (an order-2 filter at full rate) is not a band limit
    and reads as full band.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().double().numpy()
    x = np.asarray(audio, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])  # [N, L]
    full = BandEstimate(sr / 2, 0.0, 0.0, True)
    if x.shape[-1] < 16 or not np.abs(x).max() > 0:
        return full
    freqs, raw = _spectrum(x, sr)  # [F], [F] dB
    bin_hz = freqs[1] - freqs[0]
    width = max(1, int(round(SMOOTH_HZ / bin_hz))) | 1
    floor = raw[freqs >= min_freq].max() - floor_db
    raw = np.maximum(raw, floor)
    level = scipy.ndimage.median_filter(raw, size=width, mode="nearest")  # [F]
    base = scipy.ndimage.percentile_filter(raw, LOW_PERCENTILE, size=width, mode="nearest")  # [F]
    n = len(freqs)
    above = np.maximum.accumulate(base[::-1])[::-1]  # [F] highest base level at or above each bin
    lo = np.searchsorted(freqs, freqs * 2**-PASS_OCTAVES)  # [F]
    passband = window_medians(base, lo)  # [F] the median of base[lo[i] : i + 1]
    stop_at = np.minimum(np.searchsorted(freqs, freqs * 2**STOP_OCTAVES), n - 1)  # [F]
    drop = passband - above[stop_at]  # [F] dB
    valid = (freqs >= min_freq) & (base > floor)
    if not valid.any():
        return full
    edges = np.flatnonzero(valid & (drop >= min_drop))
    if not len(edges):
        worst = float(max(drop[valid].max(), 0.0))
        return BandEstimate(sr / 2, worst, _confidence(worst), True)
    top = int(edges[-1])
    # the knee: down from the edge to where the spectrum is locally flat again (the median of the
    # third-octave below within KNEE_DB), whose pass-band level is the reference
    knee = top
    while knee > 0 and level[knee] < passband[knee] - KNEE_DB:
        knee -= 1
    ref = passband[knee]
    k = knee  # the last bin within 3 dB of the pass band
    while k + 1 < n and level[k + 1] >= ref - 3.0:
        k += 1
    deep = k  # where the fall reaches min_drop
    while deep + 1 < n and level[deep] > ref - min_drop:
        deep += 1
    stop = above[min(deep + 1, n - 1)]
    fall = float(ref - above[stop_at[k]])  # the pass band over all that lies an octave above the edge
    if freqs[deep] <= CLIFF_RATIO * max(freqs[k], bin_hz):
        cutoff = _crossing(freqs, level, (ref + stop) / 2, deep)
    else:
        cutoff = _crossing(freqs, level, ref - 3.0, k)
    return BandEstimate(min(cutoff, sr / 2), fall, _confidence(fall), False)


def window_medians(x: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """np.median(x[lo[i] : i + 1]) for every i of x [F] (lo [F], lo[i] <= i), in one sort: the windows
    as rows padded with +inf, sorted, and their middle elements read (a loop of np.median calls was
    two thirds of the cutoff estimate's time)."""
    n = len(x)
    i = np.arange(n)
    length = i - lo + 1  # [F]
    cols = lo[:, None] + np.arange(int(length.max()))[None, :]  # [F, W]
    rows = np.where(cols <= i[:, None], x[np.minimum(cols, n - 1)], np.inf)  # [F, W]
    rows.sort(axis=1)
    return (rows[i, (length - 1) // 2] + rows[i, length // 2]) / 2  # [F]


def _crossing(freqs: np.ndarray, level: np.ndarray, target: float, last: int) -> float:
    """The highest frequency at or below bin `last` where `level` is still >= target, interpolated
    linearly (in dB) to the next bin."""
    idx = np.flatnonzero(level[: last + 1] >= target)
    edge = int(idx[-1]) if len(idx) else 0
    if edge + 1 < len(freqs) and level[edge] > level[edge + 1]:
        frac = (level[edge] - target) / (level[edge] - level[edge + 1])
        return float(freqs[edge] + np.clip(frac, 0.0, 1.0) * (freqs[1] - freqs[0]))
    return float(freqs[edge])


def _confidence(drop_db: float) -> float:
    return float(np.clip(drop_db / DROP_SURE, 0.0, 1.0))


def detect_cutoff(
    audio: torch.Tensor | np.ndarray, sr: int, min_drop: float = 30.0, min_freq: float = 500.0,
    floor_db: float = 110.0,
) -> float:
    """The band limit (Hz) of `audio` [..., L] (`band_edge`'s cutoff); sr / 2 when it reads as full band."""
    return band_edge(audio, sr, min_drop, min_freq, floor_db).cutoff


def estimate_band(audio: torch.Tensor, sr: int, max_seconds: float = CUTOFF_SECONDS) -> BandEstimate:
    """`band_edge` of audio [C, L] at `sr`, logged; long inputs are read through three evenly spaced
    excerpts (max_seconds in all), so cost and memory stay flat with length."""
    n = round(max_seconds * sr / 3)
    if audio.shape[-1] > 3 * n:
        starts = np.linspace(0, audio.shape[-1] - n, 3).astype(int)
        audio = torch.cat([audio[..., s : s + n] for s in starts])  # [3C, n] averaged in power
    est = band_edge(audio, sr)
    if est.full_band:
        log.info("input reads as full band (%.0f Hz; largest fall %.0f dB, confidence %.2f)",
                 est.cutoff, est.drop_db, est.confidence)
    else:
        log.info("input band limit %.0f Hz (fall %.0f dB across the edge, confidence %.2f)",
                 est.cutoff, est.drop_db, est.confidence)
    return est


def estimate_cutoff(audio: torch.Tensor, sr: int, max_seconds: float = CUTOFF_SECONDS) -> float:
    """Band limit (Hz) of audio [C, L] at `sr` (`estimate_band`), at most sr / 2."""
    return min(float(estimate_band(audio, sr, max_seconds).cutoff), sr / 2)


def lfr_mask(cutoff: float, n_fft: int, sr: int = SAMPLE_RATE, start: float = LFR_START) -> torch.Tensor:
    """Weight [n_fft / 2 + 1] of the input per STFT bin: 1 below start * cutoff, 0 from the cutoff up,
    a raised-cosine between."""
    f = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sr / n_fft
    lo = start * cutoff
    x = ((f - lo) / max(cutoff - lo, 1e-9)).clamp(0, 1)
    return (0.5 + 0.5 * torch.cos(math.pi * x)).float()


@torch.no_grad()
def low_frequency_replace(out: torch.Tensor, ref: torch.Tensor, cutoff: float, sr: int = SAMPLE_RATE,
                          n_fft: int = 2048, hop: int = 512, chunk: int = 2**20) -> torch.Tensor:
    """Replace, in place, the band of out [C, L] below `cutoff` by ref's [C, L] (crossfaded, `lfr_mask`).

    out += iSTFT(mask * STFT(ref - out)), in chunks of `chunk` samples read with n_fft of context either
    side on the global frame grid, so memory is flat and chunks join exactly. Each chunk's correction
    is applied only after the next chunk has read its context. Returns out.
    """
    mask = lfr_mask(cutoff, n_fft, sr).to(out.device)[:, None]  # [F, 1]
    window = torch.hann_window(n_fft, device=out.device)
    length = out.shape[-1]
    chunk = max(n_fft, chunk // hop * hop)
    pending = None
    for a in range(0, length, chunk):
        b = min(a + chunk, length)
        lo, hi = max(a - n_fft, 0), min(b + n_fft, length)  # lo is on the hop grid
        d = (ref[..., lo:hi].to(out.device) - out[..., lo:hi]).float()  # [C, l]
        spec = torch.stft(d, n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True)
        low = torch.istft(spec * mask, n_fft, hop, window=window, center=True, length=hi - lo)  # [C, l]
        if pending is not None:
            out[..., pending[0] : pending[1]] += pending[2]
        pending = (a, b, low[..., a - lo : b - lo].to(out.dtype))
    if pending is not None:
        out[..., pending[0] : pending[1]] += pending[2]
    return out
