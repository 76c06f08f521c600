"""Metrics against hand-computed values and an independent numpy implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jat.codecs.base import SAMPLE_RATE
from jat.data.degrade import Degradation, apply_degradation
from jat.evaluation.baselines import noise_fill
from jat.evaluation.metrics import (
    evaluate_pair,
    lsd,
    lsd_split,
    octave_bands,
    octave_energy_error,
    power_spectrogram,
    si_sdr,
)

SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SR // 2)  # [L] white noise: every bin has power


def numpy_lsd(est: np.ndarray, ref: np.ndarray, band: slice = slice(None), n_fft=2048, hop=512, eps=1e-10):
    """Independent LSD: centred frames (reflect padding), periodic Hann, |rfft|^2."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)

    def power(x):
        x = np.pad(x, n_fft // 2, mode="reflect")
        frames = np.stack([x[i : i + n_fft] for i in range(0, len(x) - n_fft + 1, hop)])
        return np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [frames, F]

    d = np.log10(power(est)[:, band] + eps) - np.log10(power(ref)[:, band] + eps)
    return float(np.mean(np.sqrt(np.mean(d**2, axis=1))))


def test_identical_signals_are_zero(ref):
    assert lsd(ref, ref) == 0.0
    assert lsd_split(ref, ref, 8000, SR) == {"lsd": 0.0, "lsd_hf": 0.0, "lsd_lf": 0.0}
    assert si_sdr(ref, ref) > 100


@pytest.mark.parametrize("gain", [0.5, 2.0, 10.0, 1e-2])
def test_gain_gives_exact_log_offset(ref, gain):
    expected = abs(2 * math.log10(gain))  # log10(g^2 S) - log10(S) in every bin of every frame
    assert lsd(gain * ref, ref) == pytest.approx(expected, abs=1e-6)
    split = lsd_split(torch.from_numpy(gain * ref), torch.from_numpy(ref), 5000, SR)
    for key in ("lsd", "lsd_hf", "lsd_lf"):
        assert split[key] == pytest.approx(expected, abs=1e-6)


def test_matches_independent_implementation(ref):
    rng = np.random.default_rng(1)
    est = ref * np.exp(rng.normal(0, 0.3, ref.shape)) + 0.1 * rng.standard_normal(ref.shape)
    assert lsd(est, ref) == pytest.approx(numpy_lsd(est, ref), rel=1e-9)
    cutoff = 6000.0
    k = math.ceil(cutoff * 2048 / SR)  # first bin at or above the cutoff
    split = lsd_split(est, ref, cutoff, SR)
    assert split["lsd_hf"] == pytest.approx(numpy_lsd(est, ref, slice(k, None)), rel=1e-9)
    assert split["lsd_lf"] == pytest.approx(numpy_lsd(est, ref, slice(0, k)), rel=1e-9)
    assert split["lsd"] == pytest.approx(lsd(est, ref), rel=1e-12)


def test_frame_average_of_square_roots():
    """LSD averages per-frame RMS log differences; it is not the RMS over all frames at once."""
    rng = np.random.default_rng(2)
    ref = rng.standard_normal(2048 * 64)
    est = ref.copy()
    est[len(ref) // 2 :] *= 10.0  # second half: offset 2 in log10 power; first half: 0
    value = lsd(est, ref)
    assert value == pytest.approx(numpy_lsd(est, ref), rel=1e-9)
    assert 0.9 < value < 1.1  # about half the frames at 2, half at 0 (global RMS would give ~1.41)


def test_split_edges_and_lr_shape(ref):
    lr = apply_degradation(torch.from_numpy(ref).float(), SR, Degradation(4000.0, "ellip", 8))
    lr = lr.double().numpy()
    split = lsd_split(lr, ref, 4000, SR)
    assert split["lsd_hf"] > 5 and split["lsd_lf"] < 1.0  # the missing band carries the error
    assert lsd_split(lr, ref, 3600, SR)["lsd_lf"] < 0.15 # below the filter's transition: nearly exact
    above = lsd_split(lr, ref, SR, SR)
    assert math.isnan(above["lsd_hf"]) and above["lsd_lf"] == pytest.approx(above["lsd"])


def test_batch_and_channels_are_averaged(ref):
    a, b = ref, np.roll(ref, 100)
    stacked_est = np.stack([2 * a, 5 * b])  # [2, L]
    stacked_ref = np.stack([a, b])
    expected = (2 * math.log10(2) + 2 * math.log10(5)) / 2
    assert lsd(stacked_est, stacked_ref) == pytest.approx(expected, abs=1e-6)
    assert lsd(stacked_est[None], stacked_ref[None]) == pytest.approx(expected, abs=1e-6)  # [B, C, L]
    with pytest.raises(ValueError, match="channels"):
        lsd(stacked_est, a)


def test_si_sdr_known_value_and_invariances(ref):
    rng = np.random.default_rng(3)
    r = ref - ref.mean()
    noise = rng.standard_normal(r.shape)
    noise -= noise.mean()
    noise -= (noise @ r) / (r @ r) * r  # orthogonal to the reference
    for snr_db in (0.0, 10.0, 20.0):
        scaled = noise * np.sqrt((r @ r) / (noise @ noise) / 10 ** (snr_db / 10))
        est = r + scaled
        assert si_sdr(est, r) == pytest.approx(snr_db, abs=1e-6)
        assert si_sdr(3.0 * est, 0.2 * r) == pytest.approx(snr_db, abs=1e-6)  # scale invariant
        assert si_sdr(est + 0.5, r) == pytest.approx(snr_db, abs=1e-6)  # means removed
    assert si_sdr(-r, r) > 100  # the optimal scale may be negative
    assert si_sdr(noise, r) < -100  # orthogonal: nothing of the target


def test_octave_bands_clip_at_nyquist():
    assert octave_bands(4000, SR) == [(4000, 8000), (8000, 16000), (16000, SR / 2)]
    assert octave_bands(12000, SR) == [(12000, SR / 2)]
    assert octave_bands(SR / 2, SR) == []


def test_octave_error_of_itself_and_of_a_gain(ref):
    same = octave_energy_error(ref, ref, 4000, SR)
    assert same.bands == octave_bands(4000, SR) and same.db == [0.0, 0.0, 0.0] and same.mean_abs == 0.0
    half = octave_energy_error(0.5 * ref, ref, 4000, SR)
    assert half.db == pytest.approx([20 * math.log10(0.5)] * 3, abs=1e-6)  # -6.02 dB in every band
    assert half.mean_abs == pytest.approx(6.0206, abs=1e-4)
    # per signal, then averaged: gains 2 and 0.5 on two channels cancel in dB
    both = octave_energy_error(np.stack([2 * ref, 0.5 * ref]), np.stack([ref, ref]), 8000, SR)
    assert both.db == pytest.approx([0.0, 0.0], abs=1e-9)


def test_octave_error_per_band_and_empty_band(ref):
    x = torch.from_numpy(ref)
    spec = torch.fft.rfft(x)
    f = torch.fft.rfftfreq(len(ref), 1 / SR)
    spec[(f >= 8000) & (f < 16000)] *= 0.1  # -20 dB in the second octave above 4 kHz only
    est = torch.fft.irfft(spec, n=len(ref))
    err = octave_energy_error(est, x, 4000, SR)
    assert err.db[1] == pytest.approx(-20.0, abs=1.0)  # + what the window leaks in from either side
    assert abs(err.db[0]) < 0.2 and abs(err.db[2]) < 0.2
    # an empty band scores the floor (1e-10 per bin and frame) against the reference's power per bin
    p = float(power_spectrogram(x[None]).mean())  # white noise: the same mean power in every band
    floor_db = 10 * (math.log10(1e-10) - math.log10(p))
    silent = octave_energy_error(torch.zeros_like(x), x, 4000, SR)
    assert silent.db == pytest.approx([floor_db] * 3, abs=0.3) and silent.mean_abs > 100
    lr = apply_degradation(x[None].float(), SR, Degradation(4000.0, "butter", 8)).double()
    dust = octave_energy_error(lr, x[None], 4000, SR)  # the LR's float32 dust: finite, far below
    assert all(math.isfinite(d) and floor_db < d < -40 for d in dust.db)


def test_evaluate_pair_keys_and_ordering(ref):
    hr = torch.from_numpy(ref).float()[None]  # [1, L]
    lr = apply_degradation(hr, SR, Degradation(6000.0, "butter", 6))
    est = hr.clone()
    est = torch.cat([est, torch.zeros(1, 3)], dim=-1)  # codec padding: cropped
    out = evaluate_pair(est, hr, lr, 6000.0, SR)
    names = ("lsd", "lsd_hf", "lsd_lf", "si_sdr", "octave_err")
    assert set(out) == {f"{m}_{who}" for m in names for who in ("model", "sinc", "fill")}
    assert all(isinstance(v, float) for v in out.values())
    assert out["lsd_model"] == 0.0 and out["lsd_hf_model"] == 0.0 and out["octave_err_model"] == 0.0
    assert out["lsd_hf_sinc"] > 5 > 1 > out["lsd_lf_sinc"]
    assert out["lsd_sinc"] == pytest.approx(lsd(lr, hr))
    assert out["si_sdr_model"] > out["si_sdr_sinc"]


def test_evaluate_pair_noise_fill_figures(ref):
    """White noise cut at 8 kHz: the noise fill gets the band's energy right (within ~1 dB per octave)
    and scores about the spread of two independent exponential spectra in log10 (~0.8) above the
    cutoff, where the empty sinc band scores |log10 eps - log10 P| ~ 10; below it, both are the input."""
    hr = torch.from_numpy(ref)[None]  # [1, L] float64
    lr = apply_degradation(hr, SR, Degradation(8000.0, "butter", 8))
    out = evaluate_pair(hr, hr, lr, 8000.0, SR, seed=3)
    fill = noise_fill(lr, 8000.0, SR, seed=3)
    assert out == evaluate_pair(hr, hr, lr, 8000.0, SR, fill=fill)  # the default fill is this one
    split = lsd_split(fill, hr, 8000.0, SR)
    assert out["lsd_hf_fill"] == split["lsd_hf"] and out["lsd_lf_fill"] == split["lsd_lf"]
    assert out["octave_err_fill"] == octave_energy_error(fill, hr, 8000.0, SR).mean_abs
    assert 0.6 < out["lsd_hf_fill"] < 1.0
    assert out["lsd_hf_sinc"] > 8 * out["lsd_hf_fill"]
    assert out["octave_err_fill"] < 1.5 and out["octave_err_sinc"] > 40  # float32 dust at -50 dB and below
    # below the cutoff the fill keeps the input: the same LSD below 0.9 cutoff; closer to it, the
    # fill's leakage through the window lifts the filter's roll-off towards the truth, never away
    below = lsd_split(lr, hr, 7200.0, SR)["lsd_lf"]
    assert lsd_split(fill, hr, 7200.0, SR)["lsd_lf"] == pytest.approx(below, abs=0.005)
    assert out["lsd_lf_fill"] < out["lsd_lf_sinc"]
    # random phases: the waveform is not recovered above the cutoff, and SI-SDR counts the fill as error
    assert out["si_sdr_fill"] < out["si_sdr_sinc"] < 0
