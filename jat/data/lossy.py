"""Lossy codec round trips for LR simulation (docs/design.md section 5): MP3, Ogg Vorbis and Ogg Opus
through libsndfile (`soundfile`), encoded to memory and decoded back, sample-aligned with the input.

Codec names: `mp3-<kbps>` (constant bit rate, one of MP3_BITRATES, e.g. mp3-64), `vorbis-q<q>` (Vorbis
variable bit rate at quality q, 0 to 10 as in oggenc, e.g. vorbis-q2) and `opus-<kbps>` (Opus at a target
bit rate of OPUS_KBPS, e.g. opus-32). Each channel (each row of [..., L]) is encoded as its own mono
stream. MP3 and Vorbis run at the signal's rate, which must be 32, 44.1 or 48 kHz (the MPEG-1 rates; the
simulation runs at 44.1 kHz). libsndfile takes Opus only at its own rates (OPUS_RATE, 48 kHz, here), so
an Opus round trip resamples to 48 kHz and back with `jat.data.audio.resample` (a zero-phase sinc, flat
to 21 kHz at 44.1 kHz: it moves nothing in time and leaves the codec's band alone).

How the settings reach the encoders (libsndfile 1.2): `compression_level` c in [0, 1] sets an MP3 CBR
bit rate of int(320 - 288 c) kbps, which LAME rounds to the nearest MPEG-1 bit rate, so c = (320 - k) / 288
gives exactly k kbps (tests read the bit rate back from the frame headers); for Vorbis, c = 1 - q / 10;
for Opus, libsndfile sets a target of int(250000 (1 - c) + 6000) bit/s per channel (6 to 256 kbps), so
c = 1 - (1000 k - 6000 + 0.5) / 250000 gives exactly k kbps (libsndfile's log states the target it set,
which tests read back; libopus's variable bit rate then lands within a few percent of it).
LAME band-limits by bit rate (a mono 64 kbps stream keeps about 16.7 kHz; tests/test_degrade.py measures
it), and at low rates zeroes whole scale-factor bands for a granule: the spectral holes real MP3s have.
libopus chooses its band by bit rate too: on mono white noise at 48 kHz it kept 20 kHz at 24 kbps and
above and about 8 kHz at 12 kbps (measured with libopus as bundled with soundfile 0.14.0).

Alignment: the MP3 decoder (mpg123 in libsndfile) reads the encoder delay and padding from the LAME tag
and returns exactly the input's samples; Vorbis and Opus streams carry their own granule positions (Opus
also its pre-skip), so they decode to the input's length. `codec_lag` still measures the remaining lag
once per (codec, rate) by cross-correlating a seeded broadband probe (0 for MP3 and Vorbis here; -2 for
Opus up to 48 kbps, whose 5 kHz probe puts libopus in SILK mode), and `codec_roundtrip` removes it, so a
decoder that does not trim would not shift the LR against the HR. Opus's residual lag depends on the mode
libopus picks for each signal, so each Opus row is then re-aligned on its own (`residual_lag`).
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import scipy.signal
import soundfile as sf
import torch

from jat.data.audio import resample

log = logging.getLogger(__name__)

MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # kbps, MPEG-1 layer III
CODEC_RATES = (32000, 44100, 48000)  # Hz, the signal rates every codec here accepts (MPEG-1)
OPUS_KBPS = (6, 256)  # the Opus target bit rates libsndfile sets (kbps per channel, inclusive)
OPUS_RATE = 48000  # Hz, the rate Opus is encoded at (the signal is resampled to it and back)
OPUS_REACH = 8  # samples; an Opus round trip is re-aligned per row within this many samples of codec_lag
ALIGN_HZ = 4000.0  # Hz; ... on its band below this (`residual_lag`)
MAX_LAG = 4096  # samples; the lag search range either side
PEAK = 0.99  # inputs louder than this are scaled down before encoding (and back after), never clipped


def parse_codec(name: str) -> tuple[str, float]:
    """'mp3-64' -> ('mp3', 64.0); 'vorbis-q2' -> ('vorbis', 2.0); 'opus-32' -> ('opus', 32.0); a clear
    ValueError otherwise."""
    kind, _, value = str(name).partition("-")
    try:
        if kind == "mp3" and int(value) in MP3_BITRATES and value == str(int(value)):
            return kind, float(value)
        if kind == "opus" and OPUS_KBPS[0] <= int(value) <= OPUS_KBPS[1] and value == str(int(value)):
            return kind, float(value)
        if kind == "vorbis" and value.startswith("q") and 0 <= float(value[1:]) <= 10:
            return kind, float(value[1:])
    except ValueError:
        pass
    raise ValueError(f"unknown codec '{name}': use mp3-<kbps> with kbps in {MP3_BITRATES}, "
                     f"vorbis-q<0..10>, or opus-<kbps> with kbps in {OPUS_KBPS[0]}..{OPUS_KBPS[1]}")


def _settings(name: str) -> dict:
    """soundfile.write arguments for a codec name (see the module docstring for the mapping)."""
    kind, value = parse_codec(name)
    if kind == "mp3":
        return dict(format="MP3", subtype="MPEG_LAYER_III", bitrate_mode="CONSTANT",
                    compression_level=(320.0 - value) / 288.0)
    if kind == "opus":  # + 0.5 bit/s: libsndfile truncates, and 1 - c may round just below the target
        return dict(format="OGG", subtype="OPUS",
                    compression_level=max(0.0, 1.0 - (1000.0 * value - 6000.0 + 0.5) / 250000.0))
    return dict(format="OGG", subtype="VORBIS", compression_level=1.0 - value / 10.0)


def encode(x: np.ndarray, sr: int, name: str) -> bytes:
    """Mono float32 x [L] encoded with codec `name` at `sr` (OPUS_RATE for Opus): the file's bytes."""
    rates = (OPUS_RATE,) if parse_codec(name)[0] == "opus" else CODEC_RATES
    if sr not in rates:
        raise ValueError(f"codec {name} needs a sample rate in {rates} Hz, got {sr}")
    buf = io.BytesIO()
    sf.write(buf, np.asarray(x, dtype=np.float32), sr, **_settings(name))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Mono float32 samples [L'] of an encoded file's bytes."""
    y, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return y[:, 0]


def _raw_roundtrip(x: np.ndarray, sr: int, name: str) -> np.ndarray:
    """Encode and decode x [L] (float32) without any alignment; length as decoded. Opus goes through
    OPUS_RATE: x resampled to it, encoded, decoded and resampled back to `sr`."""
    if parse_codec(name)[0] != "opus" or sr == OPUS_RATE:
        return decode(encode(x, sr, name))
    if sr not in CODEC_RATES:
        raise ValueError(f"codec {name} needs a sample rate in {CODEC_RATES} Hz, got {sr}")
    up = resample(torch.from_numpy(x), sr, OPUS_RATE).numpy()  # [L'] at 48 kHz
    y = decode(encode(up, OPUS_RATE, name))  # [L''] at 48 kHz
    return resample(torch.from_numpy(np.ascontiguousarray(y)), OPUS_RATE, sr).numpy()  # at sr


@functools.lru_cache(maxsize=64)
def codec_lag(name: str, sr: int) -> int:
    """Samples by which the decoded signal lags the input (measured once: cross-correlation of a 1 s
    seeded white-noise probe, low-passed at 5 kHz so every codec here keeps it, within +-MAX_LAG)."""
    probe = np.random.default_rng(0).standard_normal(sr)
    probe = scipy.signal.sosfiltfilt(scipy.signal.butter(8, 5000.0, fs=sr, output="sos"), probe)
    probe = (0.25 * probe / np.abs(probe).max()).astype(np.float32)  # [L]
    y = _raw_roundtrip(probe, sr, name).astype(np.float64)
    corr = scipy.signal.correlate(y, probe.astype(np.float64), mode="full", method="fft")  # [len(y) + L - 1]
    lags = np.arange(-(len(probe) - 1), len(y))
    window = np.abs(lags) <= MAX_LAG
    lag = int(lags[window][np.argmax(corr[window])])
    if lag:
        log.info("codec %s at %d Hz: decoded signal lags by %d samples; re-aligning", name, sr, lag)
    return lag


def codec_roundtrip(x: np.ndarray, sr: int, name: str) -> np.ndarray:
    """x [..., L] through codec `name` and back: same shape and length, float64, aligned to the input.

    Rows are encoded as separate mono streams. Rows peaking above PEAK are scaled to PEAK for the
    codec and back afterwards, so nothing clips; digital silence stays silent.
    """
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape(-1, x.shape[-1])  # [N, L]
    length = rows.shape[-1]
    lag = codec_lag(name, sr)
    out = np.zeros_like(rows)
    for i, row in enumerate(rows):
        peak = float(np.abs(row).max()) if length else 0.0
        if peak == 0.0:
            continue
        scale = peak / PEAK if peak > PEAK else 1.0
        y = _raw_roundtrip((row / scale).astype(np.float32), sr, name).astype(np.float64) * scale
        y = y[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag), y])
        n = min(length, len(y))
        out[i, :n] = y[:n]
        if parse_codec(name)[0] == "opus":
            out[i] = shift(out[i], -residual_lag(row, out[i], OPUS_REACH, sr))
    return out.reshape(x.shape)


def residual_lag(x: np.ndarray, y: np.ndarray, reach: int, sr: int) -> int:
    """The lag k in [-reach, reach] at which y [L] correlates best with x [L] (y[n + k] ~ x[n]) below
    ALIGN_HZ (over the whole band when x has almost nothing there).

    Why Opus needs it: libsndfile trims Opus's pre-skip, which holds the whole algorithmic delay, but
    the residual lag depends on the mode libopus picks for the signal: in its SILK and hybrid modes (low
    bit rates, or inputs with little above 8 kHz, such as a low-passed LR) the low band, which SILK
    codes, lags by a couple of samples; in CELT mode nothing does. One probe cannot stand for every
    signal, and no single shift aligns a hybrid frame's two layers, so the low band, where most of the
    energy is and where MP3 and Vorbis are checked, decides."""
    if len(x) <= 4 * reach:
        return 0
    sos = scipy.signal.butter(8, ALIGN_HZ, fs=sr, output="sos")
    xl, yl = scipy.signal.sosfiltfilt(sos, x), scipy.signal.sosfiltfilt(sos, y)  # zero phase: no lag added
    if np.dot(xl, xl) < 1e-3 * np.dot(x, x):
        xl, yl = x, y
    core = xl[2 * reach : len(x) - 2 * reach]  # [L - 4 reach]
    corr = np.correlate(yl[reach : len(y) - reach], core, mode="valid")  # [2 reach + 1]: k = -reach..reach
    return int(np.argmax(corr)) - reach


def shift(y: np.ndarray, k: int) -> np.ndarray:
    """y [L] moved k samples later (k < 0: earlier), zero-filled, same length."""
    if k == 0:
        return y
    out = np.zeros_like(y)
    if k > 0:
        out[k:] = y[: len(y) - k]
    else:
        out[:k] = y[-k:]
    return out


__all__ = ["CODEC_RATES", "MP3_BITRATES", "OPUS_KBPS", "OPUS_RATE", "codec_lag", "codec_roundtrip", "decode",
           "encode", "parse_codec"]
