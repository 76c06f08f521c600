"""The synthetic demo signals and the spectrogram pictures."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from jat.codecs.base import SAMPLE_RATE
from jat.data import synth
from jat.evaluation.plots import spectrogram_figure, spectrogram_image

SR = SAMPLE_RATE


def energy_fraction_db(x: np.ndarray, lo: float, hi: float = np.inf, sr: int = SR) -> float:
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return float(10 * np.log10(power[(f >= lo) & (f < hi)].sum() / power.sum()))


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return synth.demo_clip()


def test_demo_clip_deterministic_length_peak(clip):
    assert clip.dtype == np.float32 and clip.shape == (6 * SR,)
    assert np.array_equal(clip, synth.demo_clip(seed=0))
    other = synth.demo_clip(seed=1)
    assert not np.allclose(clip, other)
    assert float(np.abs(clip).max()) == pytest.approx(0.9, abs=1e-6)
    assert np.isfinite(clip).all()
    assert synth.demo_clip(2.5, sr=22050, seed=3).shape == (55125,)


def test_demo_clip_has_a_top_band_to_restore(clip):
    above_8k = energy_fraction_db(clip, 8000)
    assert -30 < above_8k < -3
    assert energy_fraction_db(clip, 16000) > -40  # the very top band is not empty either
    # energy spread over time: every half second has content above 8 kHz
    hf = scipy.signal.sosfilt(scipy.signal.butter(8, 8000, "high", fs=SR, output="sos"), clip)
    chunks = hf[: len(hf) // (SR // 2) * (SR // 2)].reshape(-1, SR // 2)
    assert (np.sqrt((chunks**2).mean(axis=1)) > 1e-3).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: synth.harmonic_tone(0.5, SR, 330.0, seed=4),
        lambda: synth.chirp(0.5, SR, 100.0, 20000.0),
        lambda: synth.noise_bursts(0.5, SR, seed=4),
        lambda: synth.speech_like(0.5, SR, seed=4),
        lambda: synth.music_like(0.5, SR, seed=4),
    ],
)
def test_parts_shape_peak_determinism(make):
    x = make()
    assert x.dtype == np.float32 and x.shape == (SR // 2,)
    assert float(np.abs(x).max()) == pytest.approx(0.9, abs=1e-6)
    assert np.array_equal(x, make())


def test_harmonic_tone_pitch_and_band():
    x = synth.harmonic_tone(1.0, SR, 440.0, vibrato_depth=0.0)
    power = np.abs(np.fft.rfft(x)) ** 2  # 1 Hz bins
    assert np.argmax(power) == 440
    assert power[880] > 100 * power[660]  # harmonic, not inharmonic
    assert energy_fraction_db(x, 0.95 * SR / 2 + 50) < -100  # no aliased partials near Nyquist


def test_chirps_sweep_where_asked():
    f_start, f_end = 200.0, 18000.0
    for method in ("linear", "logarithmic"):
        x = synth.chirp(1.0, SR, f_start, f_end, method)
        f, t, s = scipy.signal.stft(x, SR, nperseg=1024)
        peaks = f[np.argmax(np.abs(s), axis=0)]  # [frames] dominant frequency
        frac = t / t[-1]
        if method == "linear":
            expected = f_start + (f_end - f_start) * frac
        else:
            expected = f_start * (f_end / f_start) ** frac
        inner = slice(4, -4)  # away from the fades
        assert np.all(np.abs(peaks[inner] - expected[inner]) < 0.05 * expected[inner] + 2 * SR / 1024), method


def test_speech_like_is_voiced_and_formant_shaped():
    x = synth.speech_like(2.0, SR, seed=0)
    assert -40 < energy_fraction_db(x, 4000) < -3  # fricatives: some top band, most energy below
    # voiced frames are periodic with a speaking-range fundamental (90-250 Hz)
    lags = np.arange(SR // 250, SR // 90 + 1)
    voiced = scipy.signal.sosfilt(scipy.signal.butter(4, 1000, fs=SR, output="sos"), x)  # fricatives removed
    best = []
    for start in range(0, len(x) - 2048, 2048):
        frame = voiced[start : start + 2048]
        if np.sqrt(np.mean(frame**2)) < 0.05:  # skip the gaps between syllables
            continue
        ac = np.array([frame[:-lag] @ frame[lag:] for lag in lags]) / (frame @ frame)
        best.append(ac.max())
    assert len(best) >= 5 and np.median(best) > 0.5
    noise = np.random.default_rng(0).standard_normal(2048)
    assert max(noise[:-lag] @ noise[lag:] for lag in lags) / (noise @ noise) < 0.2  # the check can fail


def test_spectrogram_figure_png(tmp_path, clip):
    x = clip[: SR]
    path = tmp_path / "plots" / "spec.png"
    fig = spectrogram_figure({"input": x * 0.5, "output": x, "target": x}, SR, path=path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["input", "output", "target"]
    assert spectrogram_figure({"only": x}, SR).axes[0].get_title() == "only"
    with pytest.raises(ValueError):
        spectrogram_figure({}, SR)


def test_spectrogram_image_layout():
    t = np.arange(SR) / SR
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    img = spectrogram_image(tone, SR)
    assert img.dtype == np.uint8 and img.shape == (1025, SR // 512 + 1, 3)
    brightest_row = int(np.argmax(img.astype(float).sum(axis=(1, 2))))
    assert brightest_row == 1024 - round(1000 * 2048 / SR)  # low frequencies at the bottom
    stereo = spectrogram_image(np.stack([tone, tone]), SR)
    assert stereo.shape == img.shape
