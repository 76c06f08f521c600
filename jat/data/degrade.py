"""Low-resolution simulation (docs/design.md section 5): pure, seeded functions.

An LR example is the HR signal with everything above a cutoff removed, brought back to the HR
rate, in two stages:

1. An IIR low-pass of a random family (Butterworth, Chebyshev I, Bessel, elliptic) and order
   (2 to 10), as second-order sections, applied forward and backward (`sosfiltfilt`, as in the
   ssr_eval/NVSR/AudioSR recipes). Zero phase keeps the LR sample-aligned with the HR below the
   cutoff, so low-frequency replacement at inference and LSD-LF compare like with like. Because
   the double pass squares the magnitude, Butterworth and Bessel are designed so the zero-phase
   response is -3 dB at the cutoff (their design frequency sits a little above it);
   Chebyshev I (0.5 dB ripple) and elliptic (0.5 dB ripple, 60 dB stop band) have their pass-band
   edge at the cutoff. This stage gives each family its own roll-off shape below the cutoff.
2. Down-sampling to the matching rate and back (`audio.resample`, Kaiser sinc): the rate is
   2 x cutoff rounded up to a multiple of 100 Hz, which keeps the polyphase kernels small
   (44100 / 100 = 441 phases at most; an arbitrary integer rate could need 22050). The resampler's
   roll-off is set relative to the cutoff, not to the rounded rate, so its transition band always
   ends at the cutoff: about -1.4 dB at 0.95 x cutoff and below -70 dB from the cutoff up. This
   stage is what band-limits the signal; whatever the family or order, nothing survives above
   the cutoff.

The "sinc baseline" of docs/design.md section 8 is this LR signal itself (already back at 44.1 kHz), or
for a real LR recording, the recording resampled to 44.1 kHz (`sinc_baseline`).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.signal
import torch

from jat.codecs.base import SAMPLE_RATE
from jat.config import DataConfig
from jat.data.audio import RESAMPLE_ROLLOFF, resample

log = logging.getLogger(__name__)

FAMILIES = ("butter", "cheby1", "bessel", "ellip")  # the one list: config's default and check read it
CHEBY_RIPPLE_DB = 0.5  # pass-band ripple of cheby1 and ellip (per pass)
ELLIP_STOP_DB = 60.0  # stop-band attenuation of ellip (per pass)
RATE_STEP = 100  # the intermediate rate is a multiple of this (Hz)
EVAL_FILTER = ("butter", 8)  # the fixed degradation of validation and evaluation clips: family, order


@dataclass(frozen=True)
class Degradation:
    """One LR simulation: low-pass `family` of `order` at `cutoff` Hz, then through 2 x cutoff."""

    cutoff: float
    family: str
    order: int

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown filter family '{self.family}' (choose from {FAMILIES})")
        if int(self.order) != self.order or self.order < 1:
            raise ValueError(f"filter order must be a positive integer, got {self.order}")
        if not self.cutoff > 0:
            raise ValueError(f"cutoff must be > 0 Hz, got {self.cutoff}")


def sample_degradation(
    rng: np.random.Generator, cutoff_min: float, cutoff_max: float, families: list[str] | tuple[str, ...],
    order_min: int, order_max: int,
) -> Degradation:
    """Draw a Degradation: cutoff uniform in [cutoff_min, cutoff_max], family uniform, order uniform."""
    if not 0 < cutoff_min <= cutoff_max:
        raise ValueError(f"need 0 < cutoff_min <= cutoff_max, got {cutoff_min}, {cutoff_max}")
    if not 1 <= order_min <= order_max:
        raise ValueError(f"need 1 <= order_min <= order_max, got {order_min}, {order_max}")
    if not families:
        raise ValueError("no filter families to sample from")
    cutoff = float(rng.uniform(cutoff_min, cutoff_max))
    family = str(families[int(rng.integers(len(families)))])
    order = int(rng.integers(order_min, order_max + 1))
    return Degradation(cutoff=cutoff, family=family, order=order)


def design_lowpass(deg: Degradation, sr: int) -> np.ndarray:
    """Second-order sections [n_sections, 6] of the per-pass filter used by `lowpass`."""
    nyquist = sr / 2
    if deg.cutoff >= nyquist:
        raise ValueError(f"cutoff {deg.cutoff} Hz must be below the Nyquist frequency {nyquist} Hz")
    if deg.family in ("cheby1", "ellip"):
        return scipy.signal.iirfilter(
            deg.order, deg.cutoff, rp=CHEBY_RIPPLE_DB, rs=ELLIP_STOP_DB, btype="low", ftype=deg.family,
            fs=sr, output="sos",
        )

    # Bilinear transform with pre-warping: the digital response at f equals the analog prototype's
    # at tan(pi f / sr) / tan(pi wn / sr). Put the prototype's -1.5 dB point on the cutoff.
    ratio = _half_db_point(deg.family, deg.order)
    wn = sr / np.pi * np.arctan(np.tan(np.pi * deg.cutoff / sr) / ratio)  # always below Nyquist
    if deg.family == "bessel":
        return scipy.signal.bessel(deg.order, wn, fs=sr, norm="mag", output="sos")
    return scipy.signal.butter(deg.order, wn, fs=sr, output="sos")


@functools.lru_cache(maxsize=64)
def _half_db_point(family: str, order: int) -> float:
    """Frequency, relative to the -3 dB point, where the analog prototype's power is -1.5 dB."""
    target = 10**-0.15
    if family == "butter":  # |H|^2 = 1 / (1 + w^(2n))
        return float((1 / target - 1) ** (1 / (2 * order)))
    b, a = scipy.signal.bessel(order, 1.0, analog=True, norm="mag")
    power = lambda w: float(np.abs(scipy.signal.freqs(b, a, [w])[1][0]) ** 2) - target  # noqa: E731
    return float(scipy.optimize.brentq(power, 1e-3, 1.0, xtol=1e-12))


def lowpass(audio: torch.Tensor | np.ndarray, sr: int, deg: Degradation) -> torch.Tensor | np.ndarray:
    """Zero-phase IIR low-pass of `audio` [..., L] (see the module docstring); same type and dtype."""
    x, like = _as_numpy(audio)  # [..., L] float64
    sos = design_lowpass(deg, sr)
    length = x.shape[-1]
    if length < 2:
        return audio
    padlen = min(3 * (2 * len(sos) + 1), length - 1)
    y = scipy.signal.sosfiltfilt(sos, x, axis=-1, padlen=padlen)  # [..., L]
    return _restore(y, like)


def intermediate_rate(cutoff: float) -> int:
    """The rate the LR passes through: 2 x cutoff rounded up to a multiple of RATE_STEP Hz."""
    return int(RATE_STEP * math.ceil(2 * cutoff / RATE_STEP - 1e-9))


def apply_degradation(
    audio: torch.Tensor | np.ndarray, sr: int, deg: Degradation
) -> torch.Tensor | np.ndarray:
    """LR version of `audio` [..., L]: low-pass, then down to the matching rate and back to `sr`.

    Length, rate, type and dtype are preserved exactly.
    """
    length = audio.shape[-1]
    y = lowpass(audio, sr, deg)  # [..., L]
    y_t = torch.as_tensor(y, dtype=torch.float32)
    rate = intermediate_rate(deg.cutoff)
    if rate < sr:
        # Roll-off relative to the cutoff rather than the rounded rate: the transition ends at the cutoff.
        rolloff = RESAMPLE_ROLLOFF * 2 * deg.cutoff / rate
        y_t = resample(resample(y_t, sr, rate, rolloff=rolloff), rate, sr, rolloff=rolloff)  # [..., L']
        y_t = _fit_length(y_t, length)  # [..., L]
    if isinstance(audio, torch.Tensor):
        return y_t.to(dtype=audio.dtype, device=audio.device)
    return y_t.numpy().astype(np.asarray(audio).dtype, copy=False)


def simulate_lowres(
    audio: torch.Tensor | np.ndarray, sr: int, rng: np.random.Generator, cfg: DataConfig
) -> tuple[torch.Tensor | np.ndarray, Degradation]:
    """Draw a degradation from `cfg` (cutoff range, families, orders) and apply it to `audio` [..., L]."""
    deg = sample_degradation(rng, cfg.cutoff_min, cfg.cutoff_max, cfg.filters, cfg.order_min, cfg.order_max)
    return apply_degradation(audio, sr, deg), deg


def sinc_baseline(lr: torch.Tensor, lr_sr: int, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """The metrics baseline: LR audio [..., L] sinc-resampled to `sr` (identity if already there)."""
    return resample(lr, lr_sr, sr)


def _as_numpy(audio: torch.Tensor | np.ndarray) -> tuple[np.ndarray, torch.Tensor | np.ndarray]:
    if isinstance(audio, torch.Tensor):
        return audio.detach().cpu().double().numpy(), audio
    return np.asarray(audio, dtype=np.float64), np.asarray(audio)


def _restore(y: np.ndarray, like: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(y)).to(dtype=like.dtype, device=like.device)
    return y.astype(like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[-1] >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))
