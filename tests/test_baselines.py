"""The noise-fill baseline: the input kept below the cutoff, the slope extrapolated above it."""

import numpy as np
import pytest
import torch

from jat.codecs.base import SAMPLE_RATE
from jat.data.degrade import EVAL_FILTER, Degradation, apply_degradation
from jat.evaluation.baselines import noise_fill

SR = SAMPLE_RATE


def lowpassed(x: np.ndarray, cutoff: float) -> torch.Tensor:
    """The evaluation degradation of x [L] as float64 [1, L]."""
    return apply_degradation(torch.from_numpy(x)[None], SR, Degradation(cutoff, *EVAL_FILTER))


def pink(n: int, seed: int) -> np.ndarray:
    """1/f noise [n]: power density falls 3 dB per octave (10 log10 2)."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    x = np.fft.irfft(spec, n=n)
    return 0.1 * x / x.std()


def octave_db(est: np.ndarray, ref: np.ndarray, cutoff: float) -> list[float]:
    """10 log10 of the energy ratio per octave above the cutoff, from the clip's Fourier spectrum."""
    e, r = np.abs(np.fft.rfft(est)) ** 2, np.abs(np.fft.rfft(ref)) ** 2
    f = np.fft.rfftfreq(len(ref), 1 / SR)
    out, lo = [], cutoff
    while lo < SR / 2:
        band = (f >= lo) & (f < 2 * lo)
        out.append(10 * np.log10(e[band].sum() / r[band].sum()))
        lo *= 2
    return out


def stft(x: torch.Tensor) -> torch.Tensor:
    window = torch.hann_window(2048, dtype=torch.float64)
    return torch.stft(x.double(), 2048, 512, window=window, center=True, pad_mode="constant",
                      return_complex=True)  # [C, F, frames]


def test_nothing_to_fill_is_a_round_trip():
    """A 500 Hz tone (faded in and out) cut at 8 kHz: its octave below the cutoff is silent (window
    leakage 100 dB and more below the low band's mean), so no frame is filled and the output is the
    input's STFT round trip."""
    t = np.arange(SR) / SR
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.1)  # 100 ms linear ramps
    fade = 0.5 - 0.5 * np.cos(np.pi * fade)  # raised-cosine ramps: no click
    lr = torch.from_numpy(0.5 * fade * np.sin(2 * np.pi * 500 * t))[None]  # [1, L]
    out = noise_fill(lr, 8000.0)
    assert out.shape == lr.shape and out.dtype == torch.float64
    # float64 STFT/ISTFT round trip (~1e-16 of the peak) plus the input's own remnant above the cutoff,
    # which is dropped: per frame at most (2 / n_fft) sum_k |S_k| per sample, overlap-added with
    # sum w <= 2 and divided by sum w^2 >= 1.25 (the least at the clip's ends)
    k = int(np.ceil(8000 * 2048 / SR))
    tol = 1e-12 + 2 / 1.25 * 2 / 2048 * float(stft(lr)[:, k:].abs().sum(dim=1).max())
    assert tol < 1e-6  # the remnant is tiny (-110 dB): the bound still means something
    assert (out - lr).abs().max() <= tol


@pytest.mark.parametrize("cutoff", [4000.0, 8000.0])
def test_input_kept_below_cutoff(cutoff):
    x = np.random.default_rng(0).standard_normal(SR)
    lr = lowpassed(0.1 * x, cutoff)  # [1, L]
    out = noise_fill(lr, cutoff)
    s_in, s_out = stft(lr)[:, :, 4:-4], stft(out)[:, :, 4:-4]  # frames with a full overlap
    k = int(np.ceil(cutoff * 2048 / SR))  # first bin at or above the cutoff
    fill = s_out[:, k:].abs().max()
    assert fill > 0.1 * s_in[:, : k // 2].abs().max()  # something was added above
    # bins 16 and more below the cutoff: the fill's leakage through the window, < -60 dB of the fill
    assert (s_out[:, : k - 16] - s_in[:, : k - 16]).abs().max() < 1e-3 * fill
    # ... and the low band's power over the clip is the input's to 1e-4 dB
    ratio = s_out[:, : k - 16].abs().pow(2).sum() / s_in[:, : k - 16].abs().pow(2).sum()
    assert abs(10 * np.log10(float(ratio))) < 1e-4


def test_white_noise_band_refilled_flat():
    """A flat slope extrapolated: each octave above the cutoff gets the original white noise's energy."""
    for seed in (1, 2):
        hr = 0.1 * np.random.default_rng(seed).standard_normal(4 * SR)
        out = noise_fill(lowpassed(hr, 8000.0), 8000.0, seed=seed)[0].numpy()
        err = octave_db(out, hr, 8000.0)
        assert len(err) == 2 and np.abs(err).max() < 2.0, err


def test_pink_noise_slope_followed():
    hr = pink(4 * SR, seed=3)
    cutoff = 4000.0
    out = noise_fill(lowpassed(hr, cutoff), cutoff)[0].numpy()
    err = octave_db(out, hr, cutoff)  # pink: equal energy per octave, so the errors hold the slope
    assert len(err) == 3 and np.abs(err).max() < 2.0, err
    # slope of the fill's own power density above the cutoff: -3 dB/octave
    p = np.abs(np.fft.rfft(out)) ** 2
    f = np.fft.rfftfreq(len(out), 1 / SR)
    edges = cutoff * 2 ** np.arange(0, np.log2(SR / 2 / cutoff), 0.25)
    centres = np.log2(edges[:-1] * 2**0.125)
    pairs = list(zip(edges[:-1], edges[1:], strict=True))  # quarter-octave bands
    density = [10 * np.log10(p[(f >= a) & (f < b)].mean()) for a, b in pairs]
    slope = np.polyfit(centres, density, 1)[0]
    assert slope == pytest.approx(-10 * np.log10(2), abs=1.0)
    white = noise_fill(lowpassed(0.1 * np.random.default_rng(4).standard_normal(4 * SR), cutoff), cutoff)
    p = np.abs(np.fft.rfft(white[0].numpy())) ** 2
    density = [10 * np.log10(p[(f >= a) & (f < b)].mean()) for a, b in pairs]
    assert abs(np.polyfit(centres, density, 1)[0]) < 1.0  # and white stays flat: the slope is measured


def test_seeded_and_reproducible():
    lr = lowpassed(0.1 * np.random.default_rng(5).standard_normal(SR // 2), 6000.0).float()  # [1, L]
    a, b = noise_fill(lr, 6000.0, seed=7), noise_fill(lr, 6000.0, seed=7)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    c = noise_fill(lr, 6000.0, seed=8)
    assert not torch.equal(a, c)
    # another seed changes only the phases: the same energy above the cutoff, within a dB
    assert octave_db(c[0].double().numpy(), a[0].double().numpy(), 6000.0) == pytest.approx([0, 0], abs=1.0)
    stereo = noise_fill(torch.cat([lr, 0.5 * lr]).numpy(), 6000.0)  # numpy [2, L] works too
    assert stereo.shape == (2, lr.shape[-1])


def test_silence_stays_silent():
    assert torch.equal(noise_fill(torch.zeros(2, SR // 4), 8000.0), torch.zeros(2, SR // 4))
    # a silent stretch inside a signal gets no fill away from the signal's frames
    x = lowpassed(0.1 * np.random.default_rng(6).standard_normal(SR), 8000.0)  # [1, L]
    x[:, SR // 4 : 3 * SR // 4] = 0
    out = noise_fill(x, 8000.0)
    middle = out[:, SR // 4 + 4096 : 3 * SR // 4 - 4096]  # frames that see none of the signal
    assert torch.equal(middle, torch.zeros_like(middle))
    assert out[:, : SR // 4].abs().max() > 0.01


def test_no_band_to_fill():
    x = torch.randn(1, 4096, dtype=torch.float64)
    assert torch.equal(noise_fill(x, SR / 2), x)  # cutoff at Nyquist: nothing above it
    with pytest.raises(ValueError):
        noise_fill(x, 0.0)
