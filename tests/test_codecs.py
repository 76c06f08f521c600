"""Codecs: MDCT perfect reconstruction and scaling, DAC wrapping (tiny random model), latent normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import torch

from jat.codecs import (
    HOP,
    LATENT_DIMS,
    SAMPLE_RATE,
    CodecError,
    DACCodec,
    LatentNorm,
    LatentStats,
    MDCTCodec,
    build_codec,
    chunk_ranges,
    load_dac_model,
)
from jat.codecs.mdct import princen_bradley_window
from jat.config import CodecConfig

SR = SAMPLE_RATE


# ---------------------------------------------------------------------------------------------
# test signals


def speech_like(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A glottal pulse train (f0 gliding 110 -> 220 Hz) through three formant resonators, syllable
    envelope, at about -20 dBFS RMS. Returns [L] float32."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    f0 = np.linspace(110.0, 220.0, n)
    phase = np.cumsum(f0 / SR)
    pulses = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)  # one impulse per period
    x = pulses + 0.01 * rng.standard_normal(n)  # a little breath noise
    for freq, bw in ((700.0, 130.0), (1220.0, 70.0), (2600.0, 160.0)):
        r = math.exp(-math.pi * bw / SR)
        x = scipy.signal.lfilter([1 - r], [1, -2 * r * math.cos(2 * math.pi * freq / SR), r * r], x)
    x *= 0.5 * (1 - np.cos(2 * np.pi * 3.0 * np.arange(n) / SR))  # three syllables per second
    return torch.from_numpy(0.1 * x / np.sqrt(np.mean(x**2))).float()


def music_like(seconds: float = 1.0, seed: int = 1) -> torch.Tensor:
    """Harmonics of 220 Hz with vibrato, decaying noise bursts and a chirp up to 20 kHz, about -20 dBFS
    RMS. Returns [L] float32."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    phase = 2 * np.pi * np.cumsum(220.0 * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))) / SR
    x = sum(np.sin(h * phase) / h for h in range(1, 30) if h * 220 * 1.01 < SR / 2)
    for start in np.arange(0.1, seconds, 0.25):  # snare-like bursts
        i = int(start * SR)
        m = min(n - i, 4000)
        x[i : i + m] += 0.8 * rng.standard_normal(m) * np.exp(-np.arange(m) / 800.0)
    x += 0.3 * scipy.signal.chirp(t, f0=100.0, t1=seconds, f1=20000.0, method="logarithmic")
    return torch.from_numpy(0.1 * x / np.sqrt(np.mean(x**2))).float()


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - est.double()).pow(2).sum()))


@pytest.fixture(scope="module")
def mdct() -> MDCTCodec:
    return MDCTCodec()


# ---------------------------------------------------------------------------------------------
# MDCT


@pytest.mark.parametrize("kind", ["sine", "kbd"])
def test_window_is_princen_bradley(kind):
    w = princen_bradley_window(512, kind)
    assert w.shape == (1024,)
    torch.testing.assert_close(w[:512] ** 2 + w[512:] ** 2, torch.ones(512, dtype=torch.float64))
    torch.testing.assert_close(w, w.flip(0))


@pytest.mark.parametrize("signal", ["speech", "music"])
def test_mdct_round_trip_real_signals(mdct, signal):
    x = (speech_like if signal == "speech" else music_like)(1.0)
    stereo = torch.stack([x, 0.5 * x.roll(1000)])[:, None]  # [2, 1, L]: channels folded into the batch
    for audio in (x[None, None], stereo):
        z = mdct.encode(audio)
        assert z.shape == (audio.shape[0], 512, mdct.num_frames(audio.shape[-1]))
        y = mdct.decode(z, audio.shape[-1])
        assert y.shape == audio.shape
        assert snr_db(audio, y) > 60
        # well scaled for a network: O(1) latents, not raw coefficients of 1e-3
        assert 0.1 < float(z.std()) < 10


@pytest.mark.parametrize("length", [1, 511, 512, 513, 1023, 44101])
def test_mdct_odd_lengths(mdct, length):
    audio = 0.1 * torch.randn(2, 1, length, generator=torch.Generator().manual_seed(length))
    z = mdct.encode(audio)
    assert mdct.num_frames(length) == math.ceil(length / 512) == z.shape[-1]
    assert mdct.decode(z).shape[-1] == z.shape[-1] * 512  # uncropped: whole frames
    y = mdct.decode(z, length)
    assert y.shape == (2, 1, length)
    assert snr_db(audio, y) > 60
    # the edges are reconstructed too (start/stop windows), not only the middle
    assert snr_db(audio[..., :100], y[..., :100]) > 60
    assert snr_db(audio[..., -100:], y[..., -100:]) > 60


def test_mdct_frame_alignment(mdct):
    """Frame t is centred on samples [t*512, (t+1)*512), like DAC: a click there lights up frame t."""
    audio = torch.zeros(1, 1, 512 * 10)
    audio[..., 512 * 6 + 256] = 1.0
    energy = mdct.expand(mdct.encode(audio)).pow(2).sum(1)[0]  # [T]
    assert int(energy.argmax()) == 6
    assert energy[6] > 0.9 * energy.sum()


def test_mdct_chunked_equals_one_shot():
    """Chunking changes only which frames one matmul call holds, so the transform is the same sums in
    another batching: equal up to rounding. In float64 that is ~1e-12. In float32 a BLAS may order each
    length-2N dot product differently per call shape (and AMX/AVX-512 kernels do), so the bound is the
    worst-case dot-product error |fl(a.b) - a.b| <= n u sum|a_i b_i| <= n u ||a|| ||b|| (u = 2^-24), with
    ||basis column|| = 1: per coefficient 2 * 2N * u * ||windowed frame||, for two independent roundings.
    The latent z = sign(X) (|X|/ref)^p is Hölder-continuous with exponent p, |z(a) - z(b)| <=
    2^(1-p) (|a - b|/ref)^p, which is why the latents must not be compared with an absolute atol near 0."""
    audio = music_like(1.3)[None, None]  # [1, 1, L]
    whole, chunked = MDCTCodec(chunk_seconds=60.0), MDCTCodec(chunk_seconds=0.05)  # 4-frame chunks
    n, p, ref = whole.hop, whole.compression, whole.ref_level
    length = audio.shape[-1]
    assert chunked.chunk_frames == 4 and len(chunk_ranges(whole.num_frames(length), 4)) > 20

    # float64: exact in principle, and is so to rounding
    a64 = audio.double()
    z64 = whole.encode(a64)
    assert z64.dtype == torch.float64
    torch.testing.assert_close(chunked.encode(a64), z64, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked.decode(z64, length), whole.decode(z64, length), rtol=0, atol=1e-12)

    # float32, coefficient domain: within the derived per-frame bound
    u = 2.0**-24
    frames = torch.nn.functional.pad(a64[0, 0], (n // 2, whole.num_frames(length) * n + n // 2 - length))
    frame_norm = frames.unfold(0, 2 * n, n).norm(dim=-1)  # [T] ||frame|| >= ||window * frame||
    bound_x = 2 * (2 * n) * u * frame_norm  # [T]
    z, zc = whole.encode(audio), chunked.encode(audio)
    dx = (whole.expand(zc) - whole.expand(z)).abs().double()[0]  # [N, T]
    assert bool((dx <= bound_x[None]).all()), float((dx / bound_x[None]).max())
    # ... and in the latent domain through the compression's Hölder bound (plus z's own float32 rounding)
    bound_z = 2 ** (1 - p) * (bound_x[None] / ref) ** p + 4 * u * z.abs().double()[0]
    assert bool(((zc - z).abs().double()[0] <= bound_z).all())

    # float32 decode from the same latents: each output sample sums 2 frames' synthesis dot products
    # of length N; expand() is elementwise and identical in both, so the bound is 2 * 2 * N * u * ||X||
    coeff_norm = whole.expand(z).double()[0].norm(dim=0).max()
    bound_y = 2 * 2 * n * u * float(coeff_norm)
    dy = (chunked.decode(z, length) - whole.decode(z, length)).abs().max()
    assert float(dy) <= bound_y, (float(dy), bound_y)


def test_mdct_compression_is_invertible_and_compresses(mdct):
    coeffs = torch.tensor([-3.0, -1e-4, 0.0, 2e-6, 0.05, 0.7])
    z = mdct.compress(coeffs)
    torch.testing.assert_close(mdct.expand(z), coeffs, rtol=1e-5, atol=0)
    assert torch.equal(torch.sign(z), torch.sign(coeffs))
    assert float(z[-1]) == pytest.approx((0.7 / mdct.ref_level) ** 0.5)  # p = 0.5 by default
    # compression narrows the dynamic range: latents span fewer decades than the coefficients
    audio = speech_like(0.5)[None, None]
    linear = MDCTCodec(compression=1.0)
    lin, comp = linear.encode(audio).abs(), mdct.encode(audio).abs()
    assert float(comp.max() / comp.median()) < 0.5 * float(lin.max() / lin.median())
    assert snr_db(audio, linear.decode(linear.encode(audio), audio.shape[-1])) > 60


def test_mdct_rejects_bad_shapes(mdct):
    with pytest.raises(CodecError, match="fold extra channels"):
        mdct.encode(torch.zeros(1, 2, 1000))
    with pytest.raises(CodecError, match="latents"):
        mdct.decode(torch.zeros(1, 64, 3))
    with pytest.raises(CodecError, match="cannot decode"):
        mdct.decode(torch.zeros(1, 512, 3), length=3 * 512 + 1)


def test_build_codec_mdct():
    codec = build_codec(CodecConfig(name="mdct", mdct_compression=0.7, chunk_seconds=5.0))
    assert isinstance(codec, MDCTCodec)
    assert (codec.sample_rate, codec.hop, codec.latent_dim, codec.channels) == (44100, 512, 512, 1)
    assert codec.compression == 0.7 and codec.chunk_seconds == 5.0
    assert codec.frame_rate == pytest.approx(86.13, abs=0.01)
    assert len(codec.state_dict()) == 0  # weight-free


# ---------------------------------------------------------------------------------------------
# DAC (tiny randomly initialised model built from the real descript-audio-codec classes)


def test_dac_shapes_and_lengths(tiny_dac):
    codec = DACCodec(tiny_dac)
    assert (codec.sample_rate, codec.hop, codec.latent_dim) == (44100, 512, 64)
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.model.training  # stays frozen
    for length in (1, 512, 513, 5000):
        audio = 0.1 * torch.randn(2, 1, length, generator=torch.Generator().manual_seed(length))
        z = codec.encode(audio)
        assert z.shape == (2, 64, math.ceil(length / 512)) and codec.num_frames(length) == z.shape[-1]
        # the codec's latents are the quantized z of a one-shot dac encode
        ref = tiny_dac.encode(tiny_dac.preprocess(audio, SR))[0]
        torch.testing.assert_close(z, ref)
        assert codec.decode(z, length).shape == (2, 1, length)
        assert codec.decode(z).shape == (2, 1, z.shape[-1] * 512)


def test_dac_chunked_equals_one_shot(tiny_dac):
    audio = music_like(1.2)[None, None]  # [1, 1, L], 104 frames
    whole = DACCodec(tiny_dac, chunk_seconds=60.0)
    chunked = DACCodec(tiny_dac, chunk_seconds=0.2)  # 17-frame chunks, 21 frames of context
    z = whole.encode(audio)
    torch.testing.assert_close(chunked.encode(audio), z, rtol=1e-4, atol=1e-4)
    y = whole.decode(z, audio.shape[-1])
    torch.testing.assert_close(chunked.decode(z, audio.shape[-1]), y, rtol=1e-4, atol=1e-5)
    # without context the chunk edges differ: the context is what makes chunking exact
    blind = DACCodec(tiny_dac, chunk_seconds=0.2, context_frames=0)
    assert float((blind.encode(audio) - z).abs().max()) > 1e-2 * float(z.abs().max())
    assert float((blind.decode(z, audio.shape[-1]) - y).abs().max()) > 1e-3 * float(y.abs().max())


def test_dac_from_local_weights(tiny_dac, tmp_path):
    tiny_dac.save(str(tmp_path / "tiny.pth"))
    codec = build_codec(CodecConfig(name="dac", dac_weights=str(tmp_path / "tiny.pth"), chunk_seconds=2.0))
    assert isinstance(codec, DACCodec) and codec.chunk_seconds == 2.0 and codec.latent_dim == 64
    audio = 0.1 * torch.randn(1, 1, 3000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(codec.encode(audio), DACCodec(tiny_dac).encode(audio))


def test_dac_missing_weights_message(tmp_path, monkeypatch):
    with pytest.raises(CodecError) as err:
        load_dac_model(CodecConfig(name="dac", dac_weights=str(tmp_path / "nope.pth")))
    msg = str(err.value)
    assert "codec.dac_weights" in msg and "internet" in msg and ".cache/descript/dac" in msg

    import dac.utils

    def offline(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(dac.utils, "download", offline)
    with pytest.raises(CodecError, match="codec.dac_weights.*internet"):
        build_codec(CodecConfig(name="dac"))


# ---------------------------------------------------------------------------------------------
# latent normalisation


def test_latent_stats_match_torch_and_respect_mask():
    g = torch.Generator().manual_seed(0)
    scale = 3.0 * torch.arange(1, 9)[:, None]  # [C, 1]: channels of different spread, large mean
    batches = [100.0 + scale * torch.randn(2, 8, t, generator=g) for t in (5, 17, 9)]
    stats = LatentStats(8)
    for z in batches:
        stats.update(z)
    norm = stats.finalize()
    flat = torch.cat([z.transpose(1, 2).reshape(-1, 8) for z in batches]).double()  # [N, C]
    torch.testing.assert_close(norm.mean, flat.mean(0).float())
    torch.testing.assert_close(norm.std, flat.std(0).float())

    masked = LatentStats(8)
    z = torch.randn(3, 8, 10, generator=g)
    mask = torch.rand(3, 10, generator=g) > 0.4
    z_junk = z.clone()
    z_junk.transpose(1, 2)[~mask] = 1e6  # padded frames hold garbage
    masked.update(z_junk, mask)
    kept = z.transpose(1, 2)[mask]  # [N, C]
    torch.testing.assert_close(masked.finalize().mean, kept.mean(0))
    torch.testing.assert_close(masked.finalize().std, kept.std(0))


def test_latent_norm_round_trip_floor_and_save(tmp_path):
    stats = LatentStats(4)
    z = torch.randn(2, 4, 50)
    z[:, 3] = 7.0  # a constant channel
    stats.update(z)
    norm = stats.finalize()
    assert float(norm.std[3]) == pytest.approx(1e-5 * float(norm.std.max()), rel=1e-4)  # floored, not 0
    x = torch.randn(3, 4, 11)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)
    y = x.clone()  # in place: same values, written into the input (the upsampler's memory saving)
    assert norm.normalize(y, inplace=True) is y
    torch.testing.assert_close(y, norm.normalize(x))
    assert norm.denormalize(y, inplace=True) is y
    torch.testing.assert_close(y, x)
    zn = norm.normalize(z)
    torch.testing.assert_close(zn[:, :3].mean((0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    assert torch.isfinite(zn).all()

    norm.save(tmp_path / "norm.safetensors")
    loaded = LatentNorm.load(tmp_path / "norm.safetensors")
    torch.testing.assert_close(loaded.mean, norm.mean)
    fresh = LatentNorm.identity(4)
    fresh.load_state_dict(norm.state_dict())
    torch.testing.assert_close(fresh.std, norm.std)
    with pytest.raises(ValueError, match="positive"):
        LatentNorm(torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_latent_frames_matches_the_codecs():
    from jat.codecs import latent_frames

    codec = MDCTCodec()
    for seconds in (0.5, 1.0, 6.0, 10.0, 6.01):
        assert latent_frames(seconds) == codec.num_frames(round(seconds * SR))
    assert latent_frames(6.0) == 517


def test_codec_contract_constants_match_the_backends():
    """SAMPLE_RATE, HOP and LATENT_DIMS (the codec side's one home of these facts) are what the
    backends give: the MDCT built with its defaults, and DAC's default (44 kHz) architecture."""
    import inspect

    import dac

    assert (SAMPLE_RATE, HOP) == (44100, 512)
    mdct = MDCTCodec()
    assert (mdct.sample_rate, mdct.hop, mdct.latent_dim) == (SAMPLE_RATE, HOP, LATENT_DIMS["mdct"])
    defaults = {k: p.default for k, p in inspect.signature(dac.DAC.__init__).parameters.items()}
    # dac.DAC: latent_dim = encoder_dim * 2 ** len(encoder_rates) unless given; hop = prod(encoder_rates)
    assert defaults["latent_dim"] is None
    assert defaults["encoder_dim"] * 2 ** len(defaults["encoder_rates"]) == LATENT_DIMS["dac"] == 1024
    assert math.prod(defaults["encoder_rates"]) == HOP and defaults["sample_rate"] == SAMPLE_RATE
    assert sorted(LATENT_DIMS) == ["dac", "mdct"]  # every backend build_codec knows
