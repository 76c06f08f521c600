"""The project's own test and demo signals: deterministic from a seed, no downloads.

`demo_clip` mixes the parts below into a clip with plenty of energy above 8 kHz, so a model that
restores the top band has something to restore. Each part is also a public function for tests of
other modules. Every function returns float32 [L] with peak 0.9 (silence stays silence).
"""

from __future__ import annotations

import numpy as np
import scipy.signal

from jat.codecs.base import SAMPLE_RATE

PEAK = 0.9
TABLE = 8192  # wavetable length of harmonic_tone (harmonics up to 4095)


def _normalise(x: np.ndarray, peak: float = PEAK) -> np.ndarray:
    m = float(np.abs(x).max()) if x.size else 0.0
    return (x * (peak / m) if m > 0 else x).astype(np.float32)


def _length(seconds: float, sr: int) -> int:
    if seconds <= 0 or sr <= 0:
        raise ValueError(f"need seconds > 0 and sr > 0, got {seconds}, {sr}")
    return int(round(seconds * sr))


def _envelope(n: int, sr: int, attack: float, release: float) -> np.ndarray:
    """Linear attack, exponential decay to about -60 dB over `release` seconds."""
    t = np.arange(n) / sr
    return np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-6.9 * t / max(release, 1e-4))


def harmonic_tone(
    seconds: float = 1.0, sr: int = SAMPLE_RATE, f0: float = 220.0, vibrato_hz: float = 5.0,
    vibrato_depth: float = 0.01, tilt: float = 0.7, seed: int = 0,
) -> np.ndarray:
    """A harmonic tone up to 0.95 x Nyquist, amplitudes k^-tilt with random phases, with vibrato."""
    n = _length(seconds, sr)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    inst_f0 = f0 * (1 + vibrato_depth * np.sin(2 * np.pi * vibrato_hz * t + rng.uniform(0, 2 * np.pi)))
    cycles = np.cumsum(inst_f0) / sr  # [L] phase in periods
    # Every harmonic follows the same phase, so the waveform is one period looked up by phase:
    # a table built by an inverse FFT replaces a sum of up to a few hundred sines per sample.
    k_max = max(1, min(int(0.95 * (sr / 2) / (f0 * (1 + vibrato_depth))), TABLE // 2 - 1))
    k = np.arange(1, k_max + 1)
    spectrum = np.zeros(TABLE // 2 + 1, dtype=complex)
    spectrum[k] = k**-tilt * np.exp(1j * rng.uniform(0, 2 * np.pi, size=k_max))
    table = np.fft.irfft(spectrum, n=TABLE)  # [TABLE] one period
    pos = (cycles % 1.0) * TABLE
    i0 = pos.astype(int)
    frac = pos - i0
    out = (1 - frac) * table[i0] + frac * table[(i0 + 1) % TABLE]  # [L] linear interpolation
    return _normalise(out)


def chirp(
    seconds: float = 1.0, sr: int = SAMPLE_RATE, f_start: float = 100.0, f_end: float = 20000.0,
    method: str = "linear",
) -> np.ndarray:
    """A sine sweep from f_start to f_end (`method`: 'linear' or 'logarithmic'), faded in and out."""
    n = _length(seconds, sr)
    t = np.arange(n) / sr
    x = scipy.signal.chirp(t, f0=f_start, t1=max(t[-1], 1e-9), f1=f_end, method=method)
    fade = min(n // 2, int(0.01 * sr))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        x[:fade] *= ramp
        x[-fade:] *= ramp[::-1]
    return _normalise(x)


def noise_bursts(seconds: float = 1.0, sr: int = SAMPLE_RATE, rate: float = 4.0, seed: int = 0) -> np.ndarray:
    """Percussive noise bursts at about `rate` per second: full-band clicks, hi-hats and snares."""
    n = _length(seconds, sr)
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    hihat = scipy.signal.butter(4, 6000, btype="high", fs=sr, output="sos")
    snare = scipy.signal.butter(2, [800, min(9000, 0.45 * sr)], btype="band", fs=sr, output="sos")
    for _ in range(max(1, int(rate * seconds))):
        start = int(rng.integers(0, n))
        kind = rng.integers(3)
        release = (0.03, 0.08, 0.2)[kind]
        m = min(n - start, int(release * sr) + 1)
        burst = rng.standard_normal(m) * _envelope(m, sr, 0.001, release)
        if kind == 1:
            burst = scipy.signal.sosfilt(hihat, burst)
        elif kind == 2:
            burst = scipy.signal.sosfilt(snare, burst)
        out[start : start + m] += rng.uniform(0.3, 1.0) * burst
    return _normalise(out)


def speech_like(seconds: float = 2.0, sr: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like sound: a glottal pulse train with an f0 contour through four moving formants,
    syllable envelopes, aspiration, and fricative noise (4-11 kHz) between syllables."""
    n = _length(seconds, sr)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    # f0 contour: a slow declination with a wobble, 90-250 Hz
    wobble = 25 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    f0 = np.clip(170 - 30 * t / max(seconds, 1e-9) + wobble, 90, 250)
    phase = np.cumsum(f0) / sr
    pulses = np.diff(np.floor(phase), prepend=0.0)  # [L] one impulse per glottal period
    # glottal pulse shape (two poles near 100 Hz ~ -12 dB/oct) and lip radiation (+6 dB/oct)
    src = scipy.signal.lfilter([1.0], np.poly([0.985, 0.985]), pulses)
    src = np.diff(src, prepend=0.0) + 0.02 * rng.standard_normal(n)
    vowels = np.array([[730, 1090, 2440, 3400], [270, 2290, 3010, 3700], [300, 870, 2240, 3500],
                       [530, 1840, 2480, 3600], [660, 1720, 2410, 3300]], dtype=float)
    syllable = 0.25  # seconds per vowel target
    targets = vowels[rng.integers(len(vowels), size=int(np.ceil(seconds / syllable)) + 2)]  # [S, 4]
    block = 256
    out = np.zeros(n)
    state = np.zeros((4, 2))
    for b0 in range(0, n, block):
        pos = (b0 / sr) / syllable
        i, frac = int(pos), pos - int(pos)
        formants = (1 - frac) * targets[i] + frac * targets[i + 1]  # [4] glide between targets
        y = src[b0 : b0 + block]
        for j, (fc, bw) in enumerate(zip(formants, (80, 100, 140, 200), strict=True)):
            r = np.exp(-np.pi * bw / sr)
            a = [1.0, -2 * r * np.cos(2 * np.pi * fc / sr), r * r]
            y, state[j] = scipy.signal.lfilter([1 - r], a, y, zi=state[j])
        out[b0 : b0 + block] = y
    env = np.clip(np.sin(np.pi * t / syllable) ** 2 * 1.3, 0, 1)  # [L] syllable envelope
    voiced = _normalise(out, 1.0) * env
    fric_sos = scipy.signal.butter(4, [4000, min(11000, 0.45 * sr)], btype="band", fs=sr, output="sos")
    fricative = scipy.signal.sosfilt(fric_sos, rng.standard_normal(n))
    gaps = np.clip(1 - env * 1.5, 0, 1) * (np.sin(2 * np.pi * t / (4 * syllable)) > 0)  # some of the gaps
    return _normalise(voiced + 0.3 * _normalise(fricative, 1.0) * gaps)


def music_like(seconds: float = 3.0, sr: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Music-like sound: plucked/bowed harmonic notes from a pentatonic scale plus percussion."""
    n = _length(seconds, sr)
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    scale = 220.0 * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16, 19, 21]) / 12)
    note = 0.25
    for start in range(0, n, int(round(note * sr))):
        for _ in range(int(rng.integers(1, 4))):  # one to three voices per step
            m = min(int(round(float(rng.choice([0.25, 0.5, 1.0])) * sr)), n - start)
            f0, vib = float(rng.choice(scale)), float(rng.uniform(0, 0.015))
            tilt, attack = float(rng.uniform(0.6, 1.2)), float(rng.uniform(0.002, 0.05))
            gain, tone_seed = float(rng.uniform(0.3, 1.0)), int(rng.integers(2**31))
            if m < 32:
                continue
            tone = harmonic_tone(m / sr, sr, f0, vibrato_depth=vib, tilt=tilt, seed=tone_seed)[:m]
            out[start : start + m] += gain * tone * _envelope(m, sr, attack, m / sr)
    drums = noise_bursts(seconds, sr, rate=4.0, seed=int(rng.integers(2**31)))
    return _normalise(_normalise(out, 1.0) + 0.6 * drums)


def demo_clip(seconds: float = 6.0, sr: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """The demo signal: music, speech, a linear and an exponential chirp and noise bursts, mixed.

    Deterministic from `seed`; float32 [round(seconds * sr)], peak 0.9; about 10-20 % of the
    energy lies above 8 kHz.
    """
    n = _length(seconds, sr)
    seeds = np.random.SeedSequence(seed).generate_state(4)
    top = min(20000.0, 0.95 * sr / 2)
    parts = [
        (0.8, music_like(seconds, sr, int(seeds[0]))),
        (0.7, speech_like(seconds, sr, int(seeds[1]))),
        (0.1, chirp(seconds, sr, 200.0, top, "linear")),
        (0.1, chirp(seconds, sr, top, 100.0, "logarithmic")),
        (0.2, noise_bursts(seconds, sr, rate=3.0, seed=int(seeds[2]))),
    ]
    mix = np.zeros(n)
    for gain, part in parts:
        mix += gain * part[:n]
    return _normalise(mix)
