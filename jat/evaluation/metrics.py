"""Evaluation metrics (docs/design.md section 8): log-spectral distance (whole, above and below the
cutoff), scale-invariant SDR and the per-octave energy error above the cutoff, for a model output
and, beside it, for two baselines that learn nothing.

Why the noise fill (jat/evaluation/baselines.py) is the baseline that matters: the sinc-resampled input has an
empty band above the cutoff, and in an empty bin LSD compares log10(eps) = -10 with log10 P of the
reference, so it scores about |log10 eps - log10 P| (typically 8 to 12) there, whatever the
reference holds. Any output with roughly the right level beats that by a factor of ten: beating
sinc proves little. Random-phase noise with the input's spectral slope extrapolated upwards scores
about 0.8 on a noise-like band (the spread of two independent exponential power spectra, in
log10) and within a dB or two per octave in energy; a learned model must beat *that* clearly.
SI-SDR goes the other way: random phases are pure error to it, so the fill scores below the sinc
input. LSD and the octave error say whether a model restores the spectrum, SI-SDR whether it
restores the waveform; the fill is the bar for the first, the sinc input for the second.

Inputs are tensors or arrays shaped [L], [C, L] or [B, C, L]; leading dimensions are treated
as independent signals and the metric is averaged over them. Model output and reference must
have the same shape; a few trailing samples of difference (codec padding) are cropped.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
import torch

from jat.evaluation.baselines import noise_fill

log = logging.getLogger(__name__)

N_FFT = 2048
HOP = 512
Signal = torch.Tensor | np.ndarray  # [L], [C, L] or [B, C, L]


def _as_batch(x: Signal) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(dtype=torch.float64, device="cpu")
    return t.reshape(-1, t.shape[-1])  # [N, L]


def _pair(est: Signal, ref: Signal) -> tuple[torch.Tensor, torch.Tensor]:
    e, r = _as_batch(est), _as_batch(ref)
    if e.shape[0] != r.shape[0]:
        shapes = f"{tuple(est.shape)} vs {tuple(ref.shape)}"
        raise ValueError(f"estimate and reference differ in channels/batch: {shapes}")
    n = min(e.shape[-1], r.shape[-1])
    if n == 0:
        raise ValueError("empty signals")
    if e.shape[-1] != r.shape[-1]:
        log.debug("cropping estimate %d and reference %d samples to %d", e.shape[-1], r.shape[-1], n)
    return e[:, :n], r[:, :n]


def power_spectrogram(x: torch.Tensor, n_fft: int = N_FFT, hop: int = HOP) -> torch.Tensor:
    """|STFT|^2 [N, F, frames] of x [N, L] (Hann window, centred frames)."""
    if x.shape[-1] < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.shape[-1]))
    window = torch.hann_window(n_fft, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, window=window, center=True, return_complex=True)  # [N, F, frames]
    return spec.abs().pow(2)


def _lsd_from_power(s_est: torch.Tensor, s_ref: torch.Tensor, band: torch.Tensor, eps: float) -> float:
    """LSD over the frequency bins selected by `band` [F] of power spectra [N, F, frames]."""
    if not bool(band.any()):
        return math.nan
    diff = torch.log10(s_est[:, band] + eps) - torch.log10(s_ref[:, band] + eps)  # [N, F', frames]
    per_frame = diff.pow(2).mean(dim=1).sqrt()  # [N, frames]
    return float(per_frame.mean())


def lsd(est: Signal, ref: Signal, n_fft: int = N_FFT, hop: int = HOP,
        eps: float = 1e-10) -> float:
    """Log-spectral distance: per frame sqrt(mean_f (log10 S_est - log10 S_ref)^2), mean over frames
    and signals. 0 for identical inputs; est = g * ref gives exactly |2 log10 g| (eps aside)."""
    e, r = _pair(est, ref)
    s_est, s_ref = power_spectrogram(e, n_fft, hop), power_spectrogram(r, n_fft, hop)
    return _lsd_from_power(s_est, s_ref, torch.ones(s_ref.shape[1], dtype=torch.bool), eps)


def lsd_split(est: Signal, ref: Signal, cutoff: float, sr: int,
              n_fft: int = N_FFT, hop: int = HOP, eps: float = 1e-10) -> dict[str, float]:
    """LSD over all bins, over bins at or above `cutoff` Hz (lsd_hf) and below it (lsd_lf).

    A band with no bins (cutoff at 0 or above Nyquist) gives NaN.
    """
    e, r = _pair(est, ref)
    s_est, s_ref = power_spectrogram(e, n_fft, hop), power_spectrogram(r, n_fft, hop)
    freqs = torch.arange(s_ref.shape[1], dtype=torch.float64) * sr / n_fft  # [F]
    hf = freqs >= cutoff
    return {
        "lsd": _lsd_from_power(s_est, s_ref, torch.ones_like(hf), eps),
        "lsd_hf": _lsd_from_power(s_est, s_ref, hf, eps),
        "lsd_lf": _lsd_from_power(s_est, s_ref, ~hf, eps),
    }


def si_sdr(est: Signal, ref: Signal, eps: float = 1e-12) -> float:
    """Scale-invariant SDR in dB (means removed), averaged over signals.

    With alpha = <est, ref> / ||ref||^2: 10 log10(||alpha ref||^2 / ||est - alpha ref||^2).
    Invariant to rescaling est or ref.
    """
    e, r = _pair(est, ref)
    e = e - e.mean(dim=-1, keepdim=True)  # [N, L]
    r = r - r.mean(dim=-1, keepdim=True)  # [N, L]
    alpha = (e * r).sum(-1, keepdim=True) / (r.pow(2).sum(-1, keepdim=True) + eps)  # [N, 1]
    target = alpha * r  # [N, L]
    noise = e - target  # [N, L]
    ratio = (target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps)  # [N]
    return float((10 * torch.log10(ratio)).mean())


class OctaveError(NamedTuple):
    """Energy error per octave above the cutoff: bands [(lo, hi) Hz], db [10 log10(E_est / E_ref)]."""

    bands: list[tuple[float, float]]
    db: list[float]
    mean_abs: float  # mean of |db| over the bands (NaN without bands)


def octave_bands(cutoff: float, sr: int) -> list[tuple[float, float]]:
    """[cutoff, 2 cutoff), [2 cutoff, 4 cutoff), ... up to Nyquist, the last band clipped (and closed)."""
    bands, lo = [], float(cutoff)
    if lo <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    while lo < sr / 2:
        bands.append((lo, min(2 * lo, sr / 2)))
        lo *= 2
    return bands


def octave_energy_error(est: Signal, ref: Signal, cutoff: float, sr: int, n_fft: int = N_FFT,
                        hop: int = HOP, eps: float = 1e-10) -> OctaveError:
    """Per-octave energy error in dB above `cutoff`: 10 log10(E_est / E_ref) per band of `octave_bands`.

    Energies sum the STFT power over the whole clip (all frames, the band's bins), per signal; the
    dB figures are averaged over signals. Both energies get the LSD's floor, eps per bin and frame,
    so an empty band scores a large finite negative number (10 log10(eps / mean power per bin)).
    est = g * ref gives 20 log10 g in every band.
    """
    e, r = _pair(est, ref)
    s_est, s_ref = power_spectrogram(e, n_fft, hop), power_spectrogram(r, n_fft, hop)  # [N, F, frames]
    freqs = torch.arange(s_ref.shape[1], dtype=torch.float64) * sr / n_fft  # [F]
    bands, db = octave_bands(cutoff, sr), []
    for lo, hi in bands:
        sel = (freqs >= lo) & ((freqs < hi) | (hi >= sr / 2))  # the last band keeps the Nyquist bin
        floor = eps * int(sel.sum()) * s_ref.shape[-1]
        e_est = s_est[:, sel].sum(dim=(1, 2)) + floor  # [N]
        e_ref = s_ref[:, sel].sum(dim=(1, 2)) + floor  # [N]
        db.append(float((10 * torch.log10(e_est / e_ref)).mean()))
    mean_abs = float(np.mean(np.abs(db))) if db else math.nan
    return OctaveError(bands, db, mean_abs)


WHO = ("model", "sinc", "fill")  # the model output, the sinc-resampled input, the noise fill
PAIR_METRICS = ("lsd", "lsd_hf", "lsd_lf", "si_sdr", "octave_err")


def evaluate_pair(est: Signal, ref: Signal, lr: Signal, cutoff: float, sr: int,
                  fill: Signal | None = None, seed: int = 0) -> dict[str, float]:
    """The model and both baselines side by side: `est` is the model output, `lr` the sinc-resampled
    LR input at the same rate, `ref` the HR truth; `fill` the noise-fill baseline (default:
    `noise_fill(lr, cutoff, sr, seed)`).

    Keys: {lsd, lsd_hf, lsd_lf, si_sdr, octave_err}_{model, sinc, fill}; octave_err is the mean
    absolute per-octave energy error above the cutoff in dB (`octave_energy_error`).
    """
    if fill is None:
        fill = noise_fill(lr, cutoff, sr, seed=seed)
    out: dict[str, float] = {}
    for name, x in zip(WHO, (est, lr, fill), strict=True):
        split = lsd_split(x, ref, cutoff, sr)
        out[f"lsd_{name}"] = split["lsd"]
        out[f"lsd_hf_{name}"] = split["lsd_hf"]
        out[f"lsd_lf_{name}"] = split["lsd_lf"]
        out[f"si_sdr_{name}"] = si_sdr(x, ref)
        out[f"octave_err_{name}"] = octave_energy_error(x, ref, cutoff, sr).mean_abs
    return out
