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

Then, what real inputs add (each drawn with its own probability from `DataConfig`; all off by default,
which draws nothing more from the generator, so existing configs and shards mean what they meant):

3. Added noise at an in-band SNR drawn uniformly in [noise_snr_min, noise_snr_max] dB: white noise from a
   recorded seed, put through the same band limit (stages 1-2), scaled so that the band-limited
   signal's power over the noise's is the SNR (per row; a silent row stays silent).
4. A lossy codec round trip (`jat.data.lossy`: MP3 at a constant bit rate, Ogg Vorbis or Opus, encoded
   in memory and decoded back, re-aligned to the input), drawn uniformly from `codecs`.
5. Spectral holes: 1 to holes_max time-frequency rectangles zeroed in the STFT (Hann, HOLE_FFT points,
   hop HOLE_FFT / 4) and resynthesised, as low-bit-rate codecs drop whole bands for a while. Each hole
   lasts HOLE_SECONDS (uniform), spans a band whose lower edge is uniform in [HOLE_BAND[0], HOLE_BAND[1]) x
   cutoff and whose width is uniform in HOLE_WIDTH x cutoff (clipped at the cutoff), and starts
   uniformly inside the signal.

A `Degradation` holds everything needed to redo its output (the noise's seed included); `record()` is
the JSON list stored in shards and evaluation results: [cutoff, family, order], followed by a dict of
the extra stages only when there are any, so old records are still valid (`Degradation.from_record`).

The "sinc baseline" of docs/design.md section 8 is this LR signal itself (already back at 44.1 kHz), or
for a real LR recording, the recording resampled to 44.1 kHz (`sinc_baseline`).
"""

from __future__ import annotations

import dataclasses
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
from jat.data.lossy import codec_roundtrip, parse_codec

log = logging.getLogger(__name__)

FAMILIES = ("butter", "cheby1", "bessel", "ellip")  # the one list: config's default and check read it
CHEBY_RIPPLE_DB = 0.5  # pass-band ripple of cheby1 and ellip (per pass)
ELLIP_STOP_DB = 60.0  # stop-band attenuation of ellip (per pass)
RATE_STEP = 100  # the intermediate rate is a multiple of this (Hz)
EVAL_FILTER = ("butter", 8)  # the fixed degradation of validation and evaluation clips: family, order


HOLE_FFT = 2048  # STFT size of the spectral holes (hop HOLE_FFT // 4, Hann)
HOLE_SECONDS = (0.02, 0.3)  # duration range of one hole
HOLE_BAND = (0.25, 0.95)  # lower edge of a hole's band, as fractions of the cutoff
HOLE_WIDTH = (0.05, 0.25)  # width of a hole's band, as a fraction of the cutoff
# DataConfig fields of the real-input stages (stages 3-5), recorded with shards only when not at their default
EXTRA_STAGE_KEYS = ("noise_prob", "noise_snr_min", "noise_snr_max", "codec_prob", "codecs", "holes_prob",
                    "holes_max")
EVAL_HOLES = 8  # holes in the evaluation protocol's "holes" degradation


@dataclass(frozen=True)
class Degradation:
    """One LR simulation: low-pass `family` of `order` at `cutoff` Hz, then through 2 x cutoff; then,
    when set, white noise at `snr_db` (in band, from `noise_seed`), a `codec` round trip and `holes`
    ((start s, end s, low Hz, high Hz) rectangles zeroed in the STFT), in that order."""

    cutoff: float
    family: str
    order: int
    snr_db: float | None = None
    noise_seed: int = 0
    codec: str | None = None
    holes: tuple[tuple[float, float, float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown filter family '{self.family}' (choose from {FAMILIES})")
        if int(self.order) != self.order or self.order < 1:
            raise ValueError(f"filter order must be a positive integer, got {self.order}")
        if not self.cutoff > 0:
            raise ValueError(f"cutoff must be > 0 Hz, got {self.cutoff}")
        if self.snr_db is not None and not math.isfinite(self.snr_db):
            raise ValueError(f"noise SNR must be a finite number of dB, got {self.snr_db}")
        if self.codec is not None:
            parse_codec(self.codec)
        object.__setattr__(self, "holes", tuple(tuple(float(v) for v in h) for h in self.holes))
        for h in self.holes:
            if len(h) != 4 or not (0 <= h[0] <= h[1] and 0 <= h[2] <= h[3]):
                raise ValueError("a hole is (start s, end s, low Hz, high Hz) with start <= end and "
                                 f"low <= high, got {h}")

    def record(self) -> list:
        """JSON-ready [cutoff, family, order] plus, when any extra stage is set, a dict of them."""
        extra: dict = {}
        if self.snr_db is not None:
            extra.update(snr_db=float(self.snr_db), noise_seed=int(self.noise_seed))
        if self.codec is not None:
            extra["codec"] = self.codec
        if self.holes:
            extra["holes"] = [list(h) for h in self.holes]
        return [float(self.cutoff), str(self.family), int(self.order)] + ([extra] if extra else [])

    @classmethod
    def from_record(cls, rec: list) -> Degradation:
        """The Degradation of a `record()` list, including the old three-item [cutoff, family, order]."""
        if not isinstance(rec, (list, tuple)) or len(rec) not in (3, 4):
            raise ValueError(f"a degradation record is [cutoff, family, order(, extras)], got {rec!r}")
        extra = dict(rec[3]) if len(rec) == 4 else {}
        unknown = set(extra) - {"snr_db", "noise_seed", "codec", "holes"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in degradation record {rec!r}")
        holes = tuple(tuple(h) for h in extra.pop("holes", ()))
        return cls(float(rec[0]), str(rec[1]), int(rec[2]), holes=holes, **extra)


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


def band_limit(audio: torch.Tensor | np.ndarray, sr: int, deg: Degradation) -> torch.Tensor | np.ndarray:
    """Stages 1-2 of `audio` [..., L]: low-pass, then down to the matching rate and back to `sr`.

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


def apply_degradation(
    audio: torch.Tensor | np.ndarray, sr: int, deg: Degradation
) -> torch.Tensor | np.ndarray:
    """LR version of `audio` [..., L] under `deg`: the band limit, then noise, codec and holes when set.

    Length, rate, type and dtype are preserved exactly.
    """
    y = band_limit(audio, sr, deg)  # [..., L]
    if deg.snr_db is None and deg.codec is None and not deg.holes:
        return y
    z, like = _as_numpy(y)  # [..., L] float64
    if deg.snr_db is not None:
        z = z + band_limited_noise(z, sr, deg)
    if deg.codec is not None:
        z = codec_roundtrip(z, sr, deg.codec)  # [..., L] aligned with the input
    if deg.holes:
        z = punch_holes(z, sr, deg.holes)
    return _restore(z, like)


def band_limited_noise(y: np.ndarray, sr: int, deg: Degradation) -> np.ndarray:
    """White noise [..., L] from `deg.noise_seed`, band-limited like the LR, at `deg.snr_db` below each
    row of y [..., L] in power (zero for a silent row)."""
    noise = np.random.default_rng(deg.noise_seed).standard_normal(y.shape)  # [..., L]
    noise = band_limit(noise, sr, Degradation(deg.cutoff, deg.family, deg.order)).astype(np.float64)
    p_signal = np.mean(y**2, axis=-1, keepdims=True)  # [..., 1]
    p_noise = np.mean(noise**2, axis=-1, keepdims=True)  # [..., 1]
    gain = np.sqrt(p_signal / np.maximum(p_noise, 1e-30) / 10 ** (deg.snr_db / 10))  # [..., 1]
    return noise * gain


def hole_mask(holes, length: int, sr: int, n_fft: int = HOLE_FFT) -> np.ndarray:
    """STFT mask [n_fft / 2 + 1, frames] (hop n_fft / 4, centred frames): 0 on every frame whose centre
    and every bin whose frequency lie in a hole (start s, end s, low Hz, high Hz), 1 elsewhere."""
    hop = n_fft // 4
    t = np.arange(length // hop + 1) * hop / sr  # [T] frame centres, s
    f = np.arange(n_fft // 2 + 1) * sr / n_fft  # [F] Hz
    mask = np.ones((len(f), len(t)))
    for start, end, low, high in holes:
        mask[np.ix_((f >= low) & (f <= high), (t >= start) & (t <= end))] = 0.0
    return mask


def punch_holes(x: np.ndarray, sr: int, holes, n_fft: int = HOLE_FFT) -> np.ndarray:
    """x [..., L] with the time-frequency rectangles `holes` zeroed (`hole_mask`) and resynthesised."""
    rows = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))  # [N, L] float64
    length = rows.shape[-1]
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.stft(rows, n_fft, n_fft // 4, window=window, center=True, pad_mode="constant",
                      return_complex=True)  # [N, F, T]
    mask = torch.from_numpy(hole_mask(holes, length, sr, n_fft))  # [F, T]
    y = torch.istft(spec * mask, n_fft, n_fft // 4, window=window, center=True, length=length)  # [N, L]
    return y.numpy().reshape(x.shape)


def sample_extras(rng: np.random.Generator, deg: Degradation, seconds: float, cfg: DataConfig) -> Degradation:
    """`deg` with the real-input stages drawn from `cfg` (noise_prob, codec_prob, holes_prob) for a
    signal of `seconds`. A stage whose probability is 0 draws nothing from `rng`."""
    extra: dict = {}
    if cfg.noise_prob > 0 and rng.random() < cfg.noise_prob:
        extra.update(snr_db=float(rng.uniform(cfg.noise_snr_min, cfg.noise_snr_max)),
                     noise_seed=int(rng.integers(2**31)))
    if cfg.codec_prob > 0 and rng.random() < cfg.codec_prob:
        extra["codec"] = str(cfg.codecs[int(rng.integers(len(cfg.codecs)))])
    if cfg.holes_prob > 0 and rng.random() < cfg.holes_prob:
        extra["holes"] = sample_holes(rng, deg.cutoff, seconds, int(rng.integers(1, cfg.holes_max + 1)))
    return dataclasses.replace(deg, **extra) if extra else deg


def sample_holes(rng: np.random.Generator, cutoff: float, seconds: float, count: int
                 ) -> tuple[tuple[float, float, float, float], ...]:
    """`count` holes (start s, end s, low Hz, high Hz) in [0, seconds] x [0, cutoff] (module docstring)."""
    holes = []
    for _ in range(count):
        dur = min(float(rng.uniform(*HOLE_SECONDS)), seconds)
        start = float(rng.uniform(0.0, seconds - dur))
        low = float(rng.uniform(*HOLE_BAND)) * cutoff
        high = min(low + float(rng.uniform(*HOLE_WIDTH)) * cutoff, cutoff)
        holes.append((start, start + dur, low, high))
    return tuple(holes)


def simulate_lowres(
    audio: torch.Tensor | np.ndarray, sr: int, rng: np.random.Generator, cfg: DataConfig
) -> tuple[torch.Tensor | np.ndarray, Degradation]:
    """Draw a degradation from `cfg` (cutoff range, families, orders, then the real-input stages) and
    apply it to `audio` [..., L]."""
    deg = sample_degradation(rng, cfg.cutoff_min, cfg.cutoff_max, cfg.filters, cfg.order_min, cfg.order_max)
    deg = sample_extras(rng, deg, audio.shape[-1] / sr, cfg)
    return apply_degradation(audio, sr, deg), deg


def eval_degradation(spec: str, cutoff: float, seconds: float, seed: int = 0) -> Degradation:
    """The evaluation protocol's degradation `spec` at `cutoff`: 'lowpass' (EVAL_FILTER alone), or stages
    joined by '+': a codec name ('mp3-64', 'vorbis-q2', 'opus-32'), 'noise-<snr dB>' ('noise-30'), 'holes'
    (EVAL_HOLES holes drawn from `seed` for a signal of `seconds`), e.g. 'mp3-128+noise-40'."""
    deg = Degradation(float(cutoff), *EVAL_FILTER)
    extra: dict = {}
    for part in spec.split("+"):
        if part == "lowpass":  # the band limit every degradation starts with
            continue
        if part.startswith("noise-"):
            try:
                extra.update(snr_db=float(part.removeprefix("noise-")), noise_seed=int(seed))
            except ValueError:
                raise ValueError(f"degradation '{part}': noise-<SNR in dB>, e.g. noise-30") from None
        elif part == "holes":
            extra["holes"] = sample_holes(np.random.default_rng([seed, 1]), cutoff, seconds, EVAL_HOLES)
        else:
            try:
                extra["codec"] = part if parse_codec(part) else None
            except ValueError as exc:
                raise ValueError(f"unknown degradation '{part}' in '{spec}': use lowpass, or '+'-joined "
                                 f"mp3-<kbps>, vorbis-q<q>, opus-<kbps>, noise-<dB>, holes ({exc})") from None
    return dataclasses.replace(deg, **extra)


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
