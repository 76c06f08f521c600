"""The input's band (docs/design.md section 7): bringing it to 44.1 kHz in chunks, detecting its cutoff
(`detect_cutoff`), and keeping it in the output below that cutoff (low-frequency replacement).

Every function here works through long signals in chunks with enough context that the chunks join
exactly, so memory does not depend on the signal's length beyond its own arrays.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.signal
import torch

from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import resample, resampled_length

LFR_START = 0.9  # low-frequency replacement: input only below LFR_START * cutoff, model only above cutoff
CUTOFF_SECONDS = 30.0  # cutoff detection reads at most this much audio (three excerpts)


def output_length(length: int, sr: int) -> int:
    """Samples at 44.1 kHz for `length` samples at `sr`: ceil(length * SAMPLE_RATE / sr), the same time."""
    return resampled_length(length, sr, SAMPLE_RATE)


def resample_to_44k(audio: torch.Tensor, sr: int, chunk_seconds: float = 30.0) -> torch.Tensor:
    """audio [C, L] at `sr` -> [C, output_length(L, sr)] at 44.1 kHz (`audio.resample`, sinc), in chunks.

    Chunks start on the resampler's polyphase period and read context either side of at least 15 times
    the sinc kernel's half-width, so the result equals one-shot resampling (up to float rounding).
    """
    length = audio.shape[-1]
    out_len = output_length(length, sr)
    if sr == SAMPLE_RATE:
        return audio
    g = math.gcd(int(sr), SAMPLE_RATE)
    period, new_period = sr // g, SAMPLE_RATE // g  # `period` input samples give exactly `new_period` outputs
    ctx = period * math.ceil(1024 * max(1.0, period / new_period) / period)
    chunk = period * max(1, round(chunk_seconds * sr / period))
    out = audio.new_empty(audio.shape[0], out_len)  # [C, L']
    for a in range(0, length, chunk):
        b = min(a + chunk, length)
        lo, hi = max(a - ctx, 0), min(b + ctx, length)
        y = resample(audio[..., lo:hi], sr, SAMPLE_RATE)  # [C, ~(hi - lo) * SAMPLE_RATE / sr]
        o0, o1 = (a - lo) // period * new_period, a // period * new_period
        n = min(out_len, output_length(b, sr)) - o1
        out[..., o1 : o1 + n] = y[..., o0 : o0 + n]
    return out


def detect_cutoff(
    audio: torch.Tensor | np.ndarray, sr: int, min_drop_db: float = 25.0, min_freq: float = 500.0,
    floor_db: float = 110.0,
) -> float:
    """Estimate the band limit (Hz) of `audio` [..., L] from its average power spectrum.

    A band limit shows as a cliff: the smoothed log power falls by at least `min_drop_db` within a
    short span (4 % of the frequency, at least 100 Hz) and everything above stays below that.
    Natural spectral roll-off is far more gradual. The cutoff is the highest such cliff, placed
    where the spectrum crosses halfway (in dB) between the level just below the cliff and the
    highest level above it. Bins more than `floor_db` under the spectral peak are numerical noise
    and never start a cliff. Returns sr / 2 when no cliff is found (full-band or silent audio).

    Limitation: a gentle roll-off with no band limit (an analogue-style IIR low-pass applied at
    the full rate) has no cliff and reads as full band; give the cutoff explicitly for such input.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().double().numpy()
    x = np.asarray(audio, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])  # [N, L]
    nperseg = min(4096, x.shape[-1])
    freqs, psd = scipy.signal.welch(x, fs=sr, nperseg=nperseg, axis=-1)  # [F], [N, F]
    power = psd.mean(axis=0)  # [F] channels averaged in power, so anti-phase channels cannot cancel
    bin_hz = freqs[1] - freqs[0]
    smooth = max(1, int(round(50.0 / bin_hz)))
    power = np.convolve(power, np.ones(smooth) / smooth, mode="same")  # [F]
    level = 10 * np.log10(power + 1e-30)  # [F] dB
    # above[i]: highest level at or above bin i; gap[i]: bins from i to where the cliff must end
    above = np.maximum.accumulate(level[::-1])[::-1]  # [F]
    idx = np.arange(len(freqs))
    gap = np.maximum(np.ceil(np.maximum(0.04 * freqs, 100.0) / bin_hz), 1).astype(int)  # [F]
    ahead = np.minimum(idx + gap, len(freqs) - 1)
    # ignore bins deep in the numerical floor (float32 rounding sits ~140 dB under the signal)
    audible = level >= level[freqs >= min_freq].max() - floor_db
    valid = (freqs >= min_freq) & (idx + gap < len(freqs) - 1) & audible
    cliff = valid & (level - above[ahead] >= min_drop_db)
    if not cliff.any():
        return sr / 2
    top = int(np.flatnonzero(cliff)[-1])
    stop = above[ahead[top]]  # highest level beyond the cliff
    lo = int(np.searchsorted(freqs, 0.9 * freqs[top]))
    passband = np.percentile(level[lo : top + 1], 75)  # level just below the cliff
    half = (passband + stop) / 2
    region = idx[: ahead[top] + 1]
    crossing = region[level[region] >= half]
    edge = int(crossing[-1]) if len(crossing) else top
    if edge + 1 < len(freqs):  # interpolate between the last bin above and the first below
        l0, l1 = level[edge], level[edge + 1]
        frac = (l0 - half) / (l0 - l1) if l0 > l1 else 0.0
        return float(freqs[edge] + np.clip(frac, 0.0, 1.0) * bin_hz)
    return float(freqs[edge])


def estimate_cutoff(audio: torch.Tensor, sr: int, max_seconds: float = CUTOFF_SECONDS) -> float:
    """Band limit (Hz) of audio [C, L] at `sr` from its spectrum (`detect_cutoff`), at most sr / 2.

    Long inputs are read through three evenly spaced excerpts (max_seconds in all), so cost and memory
    stay flat with length.
    """
    n = round(max_seconds * sr / 3)
    if audio.shape[-1] > 3 * n:
        starts = np.linspace(0, audio.shape[-1] - n, 3).astype(int)
        audio = torch.cat([audio[..., s : s + n] for s in starts])  # [3C, n] averaged in power
    return min(float(detect_cutoff(audio, sr)), sr / 2)


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
