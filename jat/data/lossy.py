"""Lossy codec round trips for LR simulation (docs/design.md section 5): MP3 and Ogg Vorbis through
libsndfile (`soundfile`), encoded to memory and decoded back, sample-aligned with the input.

Codec names: `mp3-<kbps>` (constant bit rate, one of MP3_BITRATES, e.g. mp3-64) and `vorbis-q<q>` (Vorbis
variable bit rate at quality q, 0 to 10 as in oggenc, e.g. vorbis-q2). Each channel (each row of
[..., L]) is encoded as its own mono stream at the signal's rate, which must be 32, 44.1 or 48 kHz (the
MPEG-1 rates; the simulation runs at 44.1 kHz).

How the settings reach the encoders (libsndfile 1.2): `compression_level` c in [0, 1] sets an MP3 CBR
bit rate of int(320 - 288 c) kbps, which LAME rounds to the nearest MPEG-1 bit rate, so c = (320 - k) / 288
gives exactly k kbps (tests read the bit rate back from the frame headers); for Vorbis, c = 1 - q / 10.
LAME band-limits by bit rate (a mono 64 kbps stream keeps about 16.7 kHz; tests/test_degrade.py measures
it), and at low rates zeroes whole scale-factor bands for a granule: the spectral holes real MP3s have.

Alignment: the MP3 decoder (mpg123 in libsndfile) reads the encoder delay and padding from the LAME tag
and returns exactly the input's samples; Vorbis streams carry their own granule positions. `codec_lag`
still measures the remaining lag once per (codec, rate) by cross-correlating a seeded broadband probe
(0 for these builds), and `codec_roundtrip` removes it, so a decoder that does not trim would not shift
the LR against the HR.
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import scipy.signal
import soundfile as sf

log = logging.getLogger(__name__)

MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # kbps, MPEG-1 layer III
CODEC_RATES = (32000, 44100, 48000)  # Hz, rates every codec here accepts (MPEG-1)
MAX_LAG = 4096  # samples; the lag search range either side
PEAK = 0.99  # inputs louder than this are scaled down before encoding (and back after), never clipped


def parse_codec(name: str) -> tuple[str, float]:
    """'mp3-64' -> ('mp3', 64.0); 'vorbis-q2' -> ('vorbis', 2.0); a clear ValueError otherwise."""
    kind, _, value = str(name).partition("-")
    try:
        if kind == "mp3" and int(value) in MP3_BITRATES and value == str(int(value)):
            return kind, float(value)
        if kind == "vorbis" and value.startswith("q") and 0 <= float(value[1:]) <= 10:
            return kind, float(value[1:])
    except ValueError:
        pass
    raise ValueError(f"unknown codec '{name}': use mp3-<kbps> with kbps in {MP3_BITRATES}, "
                     "or vorbis-q<0..10>")


def _settings(name: str) -> dict:
    """soundfile.write arguments for a codec name (see the module docstring for the mapping)."""
    kind, value = parse_codec(name)
    if kind == "mp3":
        return dict(format="MP3", subtype="MPEG_LAYER_III", bitrate_mode="CONSTANT",
                    compression_level=(320.0 - value) / 288.0)
    return dict(format="OGG", subtype="VORBIS", compression_level=1.0 - value / 10.0)


def encode(x: np.ndarray, sr: int, name: str) -> bytes:
    """Mono float32 x [L] encoded with codec `name` at `sr`: the file's bytes."""
    if sr not in CODEC_RATES:
        raise ValueError(f"codec {name} needs a sample rate in {CODEC_RATES} Hz, got {sr}")
    buf = io.BytesIO()
    sf.write(buf, np.asarray(x, dtype=np.float32), sr, **_settings(name))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Mono float32 samples [L'] of an encoded file's bytes."""
    y, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return y[:, 0]


def _raw_roundtrip(x: np.ndarray, sr: int, name: str) -> np.ndarray:
    """Encode and decode x [L] (float32) without any alignment; length as decoded."""
    return decode(encode(x, sr, name))


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
    return out.reshape(x.shape)


__all__ = ["CODEC_RATES", "MP3_BITRATES", "codec_lag", "codec_roundtrip", "decode", "encode", "parse_codec"]
