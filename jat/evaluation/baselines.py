"""Non-learned band filling: the yardstick a learned upsampler has to beat clearly.

`noise_fill` extends the LR input's spectrum above its cutoff with random-phase noise whose level
follows, frame by frame, the spectral slope of the octave below the cutoff. It learns nothing: it
knows only that natural spectra fall off smoothly, and that is worth a great deal under a
log-spectral metric (see jat/evaluation/metrics.py for why the sinc-resampled input is a weak baseline).

The recipe, per channel (STFT: n_fft 2048, hop 512, periodic Hann, centred frames):

1. Fit, per frame, a line to the power in dB against log2(frequency) over the bins in
   [FIT_BAND[0] * cutoff, FIT_BAND[1] * cutoff). The top tenth is left out: the evaluation filter
   takes ~0.4 dB off the bins just below 0.9 cutoff and ~1 dB off those above, and would bend the
   line down. The slope (dB/octave) is the least-squares one, clamped to SLOPE_RANGE; the level is
   then set so that the line's mean *power* over the fit band equals the measured mean power (a
   line through log powers sits ~2.5 dB low on noise: E[ln P] = ln E[P] - γ).
2. Frames whose fit band is silent (mean power at or below SILENCE, or more than SILENCE_REL below
   the frame's whole low band) get no fill. The band's level is smoothed over LEVEL_FRAMES frames
   and the slope over SLOPE_FRAMES, averaging active frames only, so the fill does not flicker and
   silence stays silent. A slope error grows with the distance extrapolated and, in power, biases
   the fill upwards (a ±4 dB spread at Nyquist adds ~2 dB): hence the longer average for the slope.
3. Every bin at or above the cutoff gets the line's magnitude (extrapolated up to Nyquist) and a
   uniformly random phase from a seeded generator. An STFT with independent random phases per frame
   is not the STFT of any signal: overlap-adding it loses a factor hop / n_fft of power (each output
   sample averages n_fft / hop independent frames), so the magnitude is raised by sqrt(n_fft / hop).
4. The inverse STFT of the input's bins below the cutoff and the fill's above it (zero in silent
   frames), at the input's length, is the output: the input's remnant above the cutoff is dropped.
   Where no frame is filled, an input with nothing above the cutoff comes back as its STFT round
   trip (float rounding). Elsewhere the re-analysed bins below the cutoff differ from the input's
   only by what the random-phase fill leaks through the window: about -20 dB of the fill one bin
   below the cutoff, -60 dB six bins below, and falling (more in the first and last frames).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from jat.codecs.base import SAMPLE_RATE

N_FFT = 2048
HOP = 512
FIT_BAND = (0.5, 0.9)  # fraction of the cutoff: the octave below it, short of the LR filter's roll-off
LEVEL_FRAMES = 5  # frames (~58 ms at hop 512) over which the band's level is averaged
SLOPE_FRAMES = 15  # ... and the slope (~174 ms): one frame's slope is noisy (±3 dB/octave at 4 kHz)
SLOPE_RANGE = (-30.0, 3.0)  # dB per octave: a rising slope is not extrapolated far up
SILENCE = 1e-10  # mean |STFT|^2 per bin of the fit band at or below which a frame counts as silent
SILENCE_REL = 1e-9  # ... or this far (-90 dB) below the mean power per bin of the whole low band
LOG_FLOOR_REL = 1e-6  # bins more than 60 dB below the band's mean power enter the fit at that floor


def noise_fill(
    lr: torch.Tensor | np.ndarray, cutoff: float, sr: int = SAMPLE_RATE, seed: int = 0
) -> torch.Tensor:
    """LR audio [C, L] (or [L]) at `sr` -> the same shape with the band above `cutoff` Hz filled.

    Returns a tensor of the input's dtype (float64 for float64 input, else float32). The same
    seed gives the same output; silence gives exact silence.
    """
    t = lr.detach().cpu() if isinstance(lr, torch.Tensor) else torch.as_tensor(np.asarray(lr))
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    shape, length = t.shape, t.shape[-1]
    x = t.to(torch.float64).reshape(-1, length)  # [N, L]
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    freqs = torch.arange(N_FFT // 2 + 1, dtype=torch.float64) * sr / N_FFT  # [F]
    fit = (freqs >= FIT_BAND[0] * cutoff) & (freqs < FIT_BAND[1] * cutoff)
    high = freqs >= cutoff
    if length == 0 or cutoff >= sr / 2 or not bool(fit.any()) or not bool(high.any()):
        return x.reshape(shape).to(dtype)

    window = torch.hann_window(N_FFT, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, max(0, N_FFT - length)))  # [N, L >= n_fft]
    spec = torch.stft(padded, N_FFT, HOP, window=window, center=True, pad_mode="constant",
                      return_complex=True)  # [N, F, T]
    power = spec.abs().pow(2)  # [N, F, T]
    fit_octaves = torch.log2(freqs[fit] / cutoff)  # [F'] octaves relative to the cutoff (negative)
    band_db, slope, active = _fit_lines(power[:, fit], fit_octaves, power[:, freqs < cutoff])  # [N, T] each
    slope = _smooth(slope, active, SLOPE_FRAMES).clamp(*SLOPE_RANGE)  # [N, T]
    level = _level_at_cutoff(_smooth(band_db, active, LEVEL_FRAMES), slope, fit_octaves)  # [N, T]

    octaves = torch.log2(freqs[high] / cutoff)  # [F_hi] octaves above the cutoff
    db = level[:, None, :] + slope[:, None, :] * octaves[None, :, None]  # [N, F_hi, T] dB power
    magnitude = 10 ** (db / 20) * active[:, None, :] * math.sqrt(N_FFT / HOP)  # [N, F_hi, T]
    gen = torch.Generator().manual_seed(int(seed))
    phase = 2 * math.pi * torch.rand(magnitude.shape, generator=gen, dtype=torch.float64)  # [N, F_hi, T]
    spec[:, high] = torch.polar(magnitude, phase)  # the input below the cutoff, the fill above
    out = torch.istft(spec, N_FFT, HOP, window=window, center=True, length=padded.shape[-1])[:, :length]
    return out.reshape(shape).to(dtype)


def _fit_lines(band: torch.Tensor, octaves: torch.Tensor,
               low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-frame lines through the fit band's power band [N, F', T] at `octaves` [F'] (log2 f / cutoff).

    Returns the band's mean power in dB, the least-squares slope (dB/octave) and active (1.0 / 0.0),
    each [N, T]. `low` [N, F_lo, T] is the power below the cutoff (for the relative silence test).
    """
    mean = band.mean(dim=1)  # [N, T] mean power per bin of the fit band
    active = (mean > SILENCE) & (mean > SILENCE_REL * low.mean(dim=1))  # [N, T]
    floor = (LOG_FLOOR_REL * mean).clamp_min(1e-300)[:, None, :]  # [N, 1, T]
    y = 10 * torch.log10(torch.maximum(band, floor))  # [N, F', T] dB
    xc = (octaves - octaves.mean())[None, :, None]  # [1, F', 1]
    slope = (xc * (y - y.mean(dim=1, keepdim=True))).sum(dim=1) / xc.pow(2).sum()  # [N, T]
    return 10 * torch.log10(mean.clamp_min(1e-300)), slope, active.to(band.dtype)


def _level_at_cutoff(band_db: torch.Tensor, slope: torch.Tensor, octaves: torch.Tensor) -> torch.Tensor:
    """dB power at the cutoff [N, T] of lines with `slope` [N, T] whose mean power over the fit band's
    `octaves` [F'] is band_db [N, T] (matching power, not log power: see the module docstring)."""
    shape = torch.pow(10.0, slope[:, None, :] * octaves[None, :, None] / 10).mean(dim=1)  # [N, T]
    return band_db - 10 * torch.log10(shape)


def _smooth(v: torch.Tensor, active: torch.Tensor, frames: int) -> torch.Tensor:
    """Centred moving average of v [N, T] over `frames` (odd) frames, counting active frames only."""
    kernel = torch.ones(1, 1, frames, dtype=v.dtype)
    pad = frames // 2
    num = torch.nn.functional.conv1d((v * active)[:, None], kernel, padding=pad)[:, 0]  # [N, T]
    den = torch.nn.functional.conv1d(active[:, None], kernel, padding=pad)[:, 0]  # [N, T]
    return torch.where(den > 0, num / den.clamp_min(1e-12), v)


__all__ = ["noise_fill"]
