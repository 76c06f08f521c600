"""The input's band (docs/design.md section 7): bringing it to 44.1 kHz in chunks, estimating its cutoff, and
keeping it in the output below that cutoff (low-frequency replacement).

Every function here works through long signals in chunks with enough context that the chunks join
exactly, so memory does not depend on the signal's length beyond its own arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from jat.data.audio import resample, resampled_length
from jat.data.degrade import detect_cutoff

SR = 44100
LFR_START = 0.9  # low-frequency replacement: input only below LFR_START * cutoff, model only above cutoff
CUTOFF_SECONDS = 30.0  # cutoff detection reads at most this much audio (three excerpts)


def output_length(length: int, sr: int) -> int:
    """Samples at 44.1 kHz for `length` samples at `sr`: ceil(length * 44100 / sr), the same duration."""
    return resampled_length(length, sr, SR)


def resample_to_44k(audio: torch.Tensor, sr: int, chunk_seconds: float = 30.0) -> torch.Tensor:
    """audio [C, L] at `sr` -> [C, output_length(L, sr)] at 44.1 kHz (`audio.resample`, sinc), in chunks.

    Chunks start on the resampler's polyphase period and read context either side of at least 15 times
    the sinc kernel's half-width, so the result equals one-shot resampling (up to float rounding).
    """
    length = audio.shape[-1]
    out_len = output_length(length, sr)
    if sr == SR:
        return audio
    g = math.gcd(int(sr), SR)
    period, new_period = sr // g, SR // g  # `period` input samples give exactly `new_period` outputs
    ctx = period * math.ceil(1024 * max(1.0, period / new_period) / period)
    chunk = period * max(1, round(chunk_seconds * sr / period))
    out = audio.new_empty(audio.shape[0], out_len)  # [C, L']
    for a in range(0, length, chunk):
        b = min(a + chunk, length)
        lo, hi = max(a - ctx, 0), min(b + ctx, length)
        y = resample(audio[..., lo:hi], sr, SR)  # [C, ~(hi - lo) * 44100 / sr]
        o0, o1 = (a - lo) // period * new_period, a // period * new_period
        n = min(out_len, output_length(b, sr)) - o1
        out[..., o1 : o1 + n] = y[..., o0 : o0 + n]
    return out


def estimate_cutoff(audio: torch.Tensor, sr: int, max_seconds: float = CUTOFF_SECONDS) -> float:
    """Band limit (Hz) of audio [C, L] at `sr` from its spectrum (`degrade.detect_cutoff`), at most sr / 2.

    Long inputs are read through three evenly spaced excerpts (max_seconds in all), so cost and memory
    stay flat with length.
    """
    n = round(max_seconds * sr / 3)
    if audio.shape[-1] > 3 * n:
        starts = np.linspace(0, audio.shape[-1] - n, 3).astype(int)
        audio = torch.cat([audio[..., s : s + n] for s in starts])  # [3C, n] averaged in power
    return min(float(detect_cutoff(audio, sr)), sr / 2)


def lfr_mask(cutoff: float, n_fft: int, sr: int = SR, start: float = LFR_START) -> torch.Tensor:
    """Weight [n_fft / 2 + 1] of the input per STFT bin: 1 below start * cutoff, 0 from the cutoff up,
    a raised-cosine between."""
    f = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sr / n_fft
    lo = start * cutoff
    x = ((f - lo) / max(cutoff - lo, 1e-9)).clamp(0, 1)
    return (0.5 + 0.5 * torch.cos(math.pi * x)).float()


@torch.no_grad()
def low_frequency_replace(out: torch.Tensor, ref: torch.Tensor, cutoff: float, sr: int = SR,
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
