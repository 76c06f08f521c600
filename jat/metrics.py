"""Evaluation metrics (SPEC.md section 8): log-spectral distance (whole, above and below the
cutoff) and scale-invariant SDR, for a model output and for the sinc baseline beside it.

Inputs are tensors or arrays shaped [L], [C, L] or [B, C, L]; leading dimensions are treated
as independent signals and the metric is averaged over them. Model output and reference must
have the same shape; a few trailing samples of difference (codec padding) are cropped.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

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


def evaluate_pair(est: Signal, ref: Signal, lr: Signal, cutoff: float, sr: int) -> dict[str, float]:
    """Model and baseline figures side by side: `est` is the model output, `lr` the sinc-resampled
    LR input at the same rate (the baseline), `ref` the HR truth.

    Keys: lsd_model, lsd_hf_model, lsd_lf_model, si_sdr_model and the same with _baseline.
    """
    out: dict[str, float] = {}
    for name, x in (("model", est), ("baseline", lr)):
        split = lsd_split(x, ref, cutoff, sr)
        out[f"lsd_{name}"] = split["lsd"]
        out[f"lsd_hf_{name}"] = split["lsd_hf"]
        out[f"lsd_lf_{name}"] = split["lsd_lf"]
        out[f"si_sdr_{name}"] = si_sdr(x, ref)
    return out
