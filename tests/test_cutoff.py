"""Cutoff detection (`jat.infer.band.band_edge`): steep filters of every family and order, tonal content,
and the confidence, on signals made with the LR simulation's own filters (`jat.data.degrade`).

Tolerances, from what each signal's "cutoff" means:
* LR simulation (`apply_degradation`: low-pass, then through 2 x cutoff): the resampler ends the band at
  the cutoff (-1.4 dB at 0.95 x cutoff, < -70 dB from it), a cliff; within 3 %.
* a full-rate IIR low-pass alone (`lowpass`, no resampling): the band limit is the filter's -3 dB point
  (its cutoff for Butterworth and Bessel; for Chebyshev I and elliptic, whose cutoff is at -1 dB, a
  little above), computed from its zero-phase response: within 5 % or 300 Hz of it on noise, 7 % or
  300 Hz on the music-like clip (its own spectrum shapes the knee). Filters count as band
  limits when their zero-phase response is 40 dB down at sqrt(2) x cutoff, below Nyquist (cutoffs up to
  12 kHz: above, the bilinear transform's zero at Nyquist, not the filter, makes the fall).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.signal
import torch

from jat.codecs.base import SAMPLE_RATE
from jat.data.degrade import FAMILIES, Degradation, apply_degradation, design_lowpass, lowpass
from jat.data.synth import demo_clip
from jat.infer.band import band_edge, estimate_band, estimate_cutoff

SR = SAMPLE_RATE


def white(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(round(seconds * SR))


def pink(seconds: float = 1.0, seed: int = 1) -> np.ndarray:
    n = round(seconds * SR)
    spec = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    f[0] = f[1]
    return np.fft.irfft(spec / np.sqrt(f), n)  # power ~ 1 / f


SIGNALS = {"white": white, "pink": pink, "music": lambda: demo_clip(1.5, seed=5).astype(np.float64)}


def steep(deg: Degradation) -> bool:
    """Whether a full-rate low-pass is a band limit: zero-phase response <= -40 dB at sqrt(2) x cutoff."""
    f = np.sqrt(2) * deg.cutoff
    if f >= 0.99 * SR / 2:
        return False
    _, h = scipy.signal.sosfreqz(design_lowpass(deg, SR), worN=[f], fs=SR)
    return 20 * np.log10(np.abs(h[0]) ** 2 + 1e-300) <= -40


def minus_3db(deg: Degradation) -> float:
    """The highest frequency where the zero-phase response of `lowpass` is still >= -3 dB."""
    f = np.linspace(0, SR / 2, 44101)
    _, h = scipy.signal.sosfreqz(design_lowpass(deg, SR), worN=f, fs=SR)
    return float(f[np.flatnonzero(20 * np.log10(np.abs(h) ** 2 + 1e-300) >= -3.0)[-1]])


def check_lr_grid(signals, orders, cutoffs) -> None:
    for name in signals:
        x = SIGNALS[name]()
        for family in FAMILIES:
            for order in orders:
                for cutoff in cutoffs:
                    est = band_edge(apply_degradation(x, SR, Degradation(cutoff, family, order)), SR)
                    assert not est.full_band and est.cutoff == pytest.approx(cutoff, rel=0.03), (
                        name, family, order, cutoff, est)


def check_full_rate_grid(signals, orders, cutoffs) -> int:
    checked = 0
    for name in signals:
        x = SIGNALS[name]()
        rel = 0.07 if name == "music" else 0.05
        for family in FAMILIES:
            for order in orders:
                for cutoff in cutoffs:
                    deg = Degradation(cutoff, family, order)
                    if not steep(deg):
                        continue
                    est, true = band_edge(lowpass(x, SR, deg), SR), minus_3db(deg)
                    assert abs(est.cutoff - true) <= max(rel * true, 300.0), (name, family, order, true, est)
                    checked += 1
    return checked


def test_lr_simulation_grid():
    check_lr_grid(["white", "music"], (2, 6, 10), (3000.0, 6000.0, 11025.0, 16000.0))


@pytest.mark.slow
def test_lr_simulation_full_grid():
    check_lr_grid(list(SIGNALS), range(2, 11), (3000.0, 4000.0, 5500.0, 8000.0, 11025.0, 13000.0, 16000.0))


def test_full_rate_steep_filters():
    # the case first: an order-10 Butterworth at 8 kHz (no resampling) once read as full band
    for x in (white(), demo_clip(1.5, seed=5)):
        est = band_edge(lowpass(x, SR, Degradation(8000.0, "butter", 10)), SR)
        assert not est.full_band and est.cutoff == pytest.approx(8000.0, rel=0.05)
    assert check_full_rate_grid(["white", "music"], (4, 6, 10), (3000.0, 5000.0, 8000.0, 12000.0)) >= 30


@pytest.mark.slow
def test_full_rate_full_grid():
    cutoffs = (3000.0, 4000.0, 5000.0, 6500.0, 8000.0, 10000.0, 12000.0)
    assert check_full_rate_grid(list(SIGNALS), range(2, 11), cutoffs) >= 150


def test_tone_over_noise_is_the_noise_band():
    t = np.arange(SR) / SR
    tone = 0.5 * np.sin(2 * np.pi * 880 * t)  # 34 dB over the noise's total power, ~70 dB over a bin
    est = band_edge(tone + 0.01 * white(), SR)
    assert est.full_band and est.cutoff == SR / 2
    limited = apply_degradation(white(), SR, Degradation(12000.0, "butter", 8))
    est = band_edge(tone + 0.01 * limited, SR)
    assert est.cutoff == pytest.approx(12000.0, rel=0.03)


def test_harmonics_are_not_a_band_limit():
    t = np.arange(SR) / SR
    harmonics = sum(np.sin(2 * np.pi * 440 * k * t + k) / k for k in range(1, 12))  # top partial 4840 Hz
    assert band_edge(harmonics, SR).full_band  # nothing but partials: no evidence of a band limit
    assert band_edge(harmonics + 0.003 * white(), SR).full_band
    limited = apply_degradation(white(), SR, Degradation(9000.0, "ellip", 6))
    assert band_edge(harmonics + 0.003 * limited, SR).cutoff == pytest.approx(9000.0, rel=0.03)


def test_natural_spectra_read_full_band():
    brown = np.cumsum(white()) * 0.01  # power ~ 1 / f^2
    for x in (white(), pink(), brown, demo_clip(2.0)):
        est = band_edge(x, SR)
        assert est.full_band and est.cutoff == SR / 2


def test_confidence_higher_for_a_clear_edge():
    clear = band_edge(apply_degradation(white(), SR, Degradation(6000.0, "cheby1", 6)), SR)
    full = band_edge(white(), SR)
    assert clear.drop_db > 60 and clear.confidence == 1.0
    assert full.drop_db < 10 and full.confidence < 0.2
    assert band_edge(np.zeros(SR), SR) == band_edge(np.zeros(3), SR)  # silence and scraps: full band, 0
    assert band_edge(np.zeros(SR), SR).confidence == 0.0


def test_estimate_band_logs_and_estimate_cutoff_agrees(caplog):
    lr = torch.from_numpy(apply_degradation(white(2.0), SR, Degradation(7000.0, "bessel", 4))).float()[None]
    with caplog.at_level(logging.INFO, logger="jat.infer.band"):
        est = estimate_band(lr, SR)
    assert est.cutoff == pytest.approx(7000.0, rel=0.03)
    assert estimate_cutoff(lr, SR) == est.cutoff
    assert any("band limit" in r.getMessage() and "confidence" in r.getMessage() for r in caplog.records)


def test_window_medians_equal_numpy_medians_of_each_window():
    """The one-sort medians are np.median's, bit for bit: odd and even windows, ties, one bin, growing
    windows as the pass band's third octave gives them and arbitrary ones."""
    from jat.infer.band import window_medians

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300, 2049):
        for x in (rng.normal(size=n), rng.integers(0, 4, size=n).astype(float)):  # ties too
            freqs = np.arange(n) * 10.77
            for lo in (np.searchsorted(freqs, freqs * 2 ** (-1 / 3)), rng.integers(0, np.arange(n) + 1)):
                want = np.array([np.median(x[lo[i] : i + 1]) for i in range(n)])
                assert np.array_equal(window_medians(x, lo), want)
