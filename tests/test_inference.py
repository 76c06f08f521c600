"""Upsampling: windows and their blend, noise, cutoff, low-frequency replacement, files and the CLI."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import CHILD_ENV, ROOT, make_checkpoint, without_root_powers
from safetensors.torch import load_file
from torch import nn

from jat.checkpoint import store as ckpt
from jat.cli import infer
from jat.codecs import LatentNorm, MDCTCodec
from jat.codecs.base import SAMPLE_RATE
from jat.codecs.latent import LatentSpace
from jat.config import Config
from jat.data.audio import AudioError, level_gain, resample, restore_level
from jat.data.degrade import Degradation, apply_degradation
from jat.data.synth import demo_clip, harmonic_tone
from jat.infer.band import estimate_cutoff, low_frequency_replace, output_length, resample_to_44k
from jat.infer.files import plan, write_output
from jat.infer.upsampler import SHARED_NOISE, Upsampler, frame_noise, window_ranges, window_weights
from jat.model.flow import FlowMatching

SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def upsampler(checkpoint, **kw) -> Upsampler:
    return Upsampler.from_checkpoint(checkpoint, device="cpu", precision=kw.pop("precision", "fp32"), **kw)


def clip(seconds: float, sr: int = SR, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """[C, L]: the demo clip (a harmonic tone below 44.1 kHz), its own per channel, quieter and quieter."""
    tone = lambda s, r, seed: harmonic_tone(s, r, f0=110.0 * (1 + seed % 3), seed=seed)  # noqa: E731
    make = demo_clip if sr >= SR else tone
    x = torch.stack([torch.from_numpy(make(seconds, sr, seed=seed + k)) for k in range(channels)])
    return x * torch.linspace(1.0, 0.3, channels)[:, None]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = infer.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_python(*args, prefix=(), **kwargs) -> subprocess.CompletedProcess:
    """Run `python *args` in the repository, as a user would, after `prefix`."""
    cmd = [*prefix, sys.executable, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=CHILD_ENV, **kwargs)


# --- pure pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 30, 31, 47, 100, 257])
def test_windows_cover_overlap_and_blend_to_one(total):
    window, overlap = 31, 8
    ranges = window_ranges(total, window, overlap)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    if total <= window:
        assert ranges == [(0, total)] and torch.equal(window_weights(ranges, 0), torch.ones(total))
        return
    assert all(e - s == window for s, e in ranges)
    assert all(ranges[i + 1][0] <= ranges[i][1] - overlap for i in range(len(ranges) - 1))
    wsum = torch.zeros(total)
    for i, (s, e) in enumerate(ranges):
        w = window_weights(ranges, i)
        assert bool((w > 0).all()) and bool((w <= 1).all())
        wsum[s:e] += w
    assert bool((wsum > 0.99).all()) and bool((wsum < 1.01).all())


def test_frame_noise_depends_only_on_seed_stream_and_frame():
    whole = frame_noise(7, 1, 0, 300, 4)  # [4, 300]
    assert torch.equal(frame_noise(7, 1, 70, 201, 4), whole[:, 70:201])
    assert not torch.allclose(frame_noise(7, 2, 0, 300, 4), whole)
    assert not torch.allclose(frame_noise(8, 1, 0, 300, 4), whole)
    assert abs(float(whole.std()) - 1) < 0.05


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 48000, 96000])
def test_resampling_keeps_duration_to_the_sample_and_chunks_join_exactly(sr):
    n = int(2.3 * sr) + 7
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, n)).astype(np.float32))  # [2, n]
    y = resample_to_44k(x, sr, chunk_seconds=0.5)
    assert y.shape == (2, output_length(n, sr)) and abs(y.shape[-1] / SR - n / sr) < 1 / SR
    assert torch.allclose(y, resample(x, sr, SR), atol=1e-5)


@pytest.mark.parametrize("cutoff", [4000.0, 8000.0, 11025.0, 16000.0])
def test_cutoff_detected_from_band_limited_input(cutoff):
    noise = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 2 * SR)).astype(np.float32))
    lr = apply_degradation(noise, SR, Degradation(cutoff, "cheby1", 8))  # [1, L] at 44.1 kHz
    assert estimate_cutoff(lr, SR) == pytest.approx(cutoff, rel=0.03)
    native_sr = int(2 * cutoff)  # a real low-rate recording: band-limited by its own Nyquist
    native = np.random.default_rng(2).standard_normal((2, 40 * native_sr)).astype(np.float32)
    native = torch.from_numpy(native)  # [2, L] 40 s
    assert estimate_cutoff(native, native_sr) == pytest.approx(cutoff, rel=0.05)  # 40 s: read by excerpts
    assert estimate_cutoff(noise, SR) == SR / 2  # full band


def test_low_frequency_replacement_is_chunked_exactly():
    g = torch.Generator().manual_seed(0)
    out, ref = torch.randn(2, 50_000, generator=g), torch.randn(2, 50_000, generator=g)
    y = low_frequency_replace(out.clone(), ref, 5000.0)
    assert torch.allclose(y, low_frequency_replace(out.clone(), ref, 5000.0, chunk=4096), atol=1e-5)
    spec = lambda x: torch.stft(x, 2048, 512, window=torch.hann_window(2048), return_complex=True)  # noqa: E731
    f = torch.arange(1025) * SR / 2048
    low, high = f < 0.85 * 5000, f > 5000
    err = (spec(y) - spec(ref))[:, low].abs().pow(2).sum() / spec(ref)[:, low].abs().pow(2).sum()
    assert err < 1e-4  # below the cutoff: the reference
    err = (spec(y) - spec(out))[:, high].abs().pow(2).sum() / spec(out)[:, high].abs().pow(2).sum()
    assert err < 1e-4  # above it: the model


# --- the upsampler -------------------------------------------------------------------------------------


class LocalDenoiser(nn.Module):
    """An x-predictor that looks at 3 neighbouring frames only: windowing cannot change it away from
    window edges, so a windowed run must reproduce the one-window run there exactly."""

    def __init__(self, c: int = 512):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv1d(2 * c, c, 3, padding=1)

    def forward(self, x_t, t, c, mask=None):
        return self.conv(torch.cat([x_t, c], 1)) * (1 + t[:, None, None])  # [B, C, T]


class ContextGain(nn.Module):
    """x̂ = c scaled by its window's mean magnitude: like attention, each window sees its own context,
    so neighbouring windows disagree and only the blend can join them smoothly."""

    def forward(self, x_t, t, c, mask=None):
        return c * (0.5 + 20 * c.abs().mean(dim=(1, 2), keepdim=True))  # [B, C, T]


class SpyCodec(MDCTCodec):
    def decode(self, latents, length=None):
        self.decoded = latents.clone()
        return super().decode(latents, length)


def plain(model, window, overlap=0.2, **kw) -> Upsampler:
    cfg = Config.from_yaml(ROOT / "configs" / "tiny.yaml")
    latents = LatentSpace(SpyCodec(), LatentNorm.identity(512))
    return Upsampler(model, latents, FlowMatching(cfg.flow), "cpu", window_seconds=window,
                     overlap_seconds=overlap, **kw)


def test_one_window_equals_the_plain_composition(checkpoint):
    """Short input: the windowed path is exactly level, encode, sample, decode, restore level."""
    up = upsampler(checkpoint, window_seconds=10.0)
    x = clip(1.3, channels=2)  # [C, L] at 44.1 kHz
    res = up.upsample(x, SR, lfr=False, steps=3, seed=5)
    gain = level_gain(x)  # [C]
    c = up.latents.encode((x * gain[:, None])[:, None])  # [C, Cz, T]
    noise = frame_noise(5, SHARED_NOISE, 0, c.shape[-1], c.shape[1]).expand(c.shape[0], -1, -1)  # [C, Cz, T]
    z = up.sample_latents(c, steps=3, noise=noise)  # every channel from the same noise, as windows draw it
    ref = restore_level(up.latents.decode(z, length=x.shape[-1])[:, 0], gain)  # [C, L]
    assert torch.equal(res.audio, ref)


def test_windowed_run_equals_one_window_away_from_edges():
    x = clip(3.0, channels=2)
    kw = dict(lfr=False, steps=3, solver="euler", seed=1, cutoff=8000)
    whole = plain(LocalDenoiser(), window=10.0).upsample(x, SR, **kw).audio
    up = plain(LocalDenoiser(), window=0.5, overlap=0.15)
    windowed = up.upsample(x, SR, **kw).audio
    T = -(-x.shape[-1] // 512)
    ranges = window_ranges(T, up.window, up.overlap)
    assert len(ranges) >= 5
    far = torch.ones(x.shape[-1], dtype=torch.bool)
    for s, e in ranges:  # 3 Euler steps see 3 frames either side; MDCT frames reach half a hop beyond
        for edge in (s, e):
            if 0 < edge < T:
                far[max(0, (edge - 4) * 512) : (edge + 4) * 512] = False
    assert far.float().mean() > 0.5
    scale = whole.abs().max()
    assert torch.allclose(windowed[:, far], whole[:, far], atol=1e-5 * scale)
    assert not torch.allclose(windowed, whole, atol=1e-3 * scale)  # the edges do differ


def test_window_joins_are_smooth():
    t = torch.arange(int(4.0 * SR)) / SR
    x = (torch.linspace(0.05, 0.9, len(t)) * torch.sin(2 * math.pi * 220 * t))[None]  # [1, L] getting louder
    up = plain(ContextGain(), window=0.5, overlap=0.15)
    y = up.upsample(x, SR, lfr=False, steps=2, cutoff=8000).audio[0]
    T = up.latents.codec.decoded.shape[-1]
    ranges = window_ranges(T, up.window, up.overlap)
    # the blended latents are c times a gain that moves from each window's gain to the next one's
    # gradually: no faster than a raised-cosine crossfade over the overlap (a hard cut jumps by the
    # whole difference in one frame)
    c = up.latents.encode(x[None])[0]  # [C, T]
    gain = up.latents.codec.decoded[0].abs().sum(0) / c.abs().sum(0)  # [T]
    g = torch.tensor([0.5 + 20 * float(c[:, s:e].abs().mean()) for s, e in ranges])  # each window's own gain
    step_g = float((g[1:] - g[:-1]).abs().max())
    min_overlap = min(ranges[i][1] - ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert step_g > 0.1  # the windows really disagree
    assert float((gain[1:] - gain[:-1]).abs().max()) <= 1.05 * step_g * math.pi / (2 * min_overlap)
    # audio: no sample-to-sample jump near a window edge above the signal's own largest step elsewhere
    steps = (y[1:] - y[:-1]).abs()
    near = torch.zeros_like(steps, dtype=torch.bool)
    for s, e in ranges:
        for edge in (s, e):
            if 0 < edge < T:
                near[max(0, (edge - 1) * 512) : (edge + 1) * 512] = True
    assert float(steps[near].max()) <= float(steps[~near].max())


def test_real_model_windowed_run_has_no_seams(checkpoint):
    up = upsampler(checkpoint, window_seconds=0.4, overlap_seconds=0.1)
    x = apply_degradation(clip(2.5), SR, Degradation(6000.0, "butter", 8))
    y = up.upsample(x, SR, steps=2, cutoff=6000.0).audio[0]
    steps = (y[1:] - y[:-1]).abs()
    T = -(-x.shape[-1] // 512)
    near = torch.zeros_like(steps, dtype=torch.bool)
    for s, _ in window_ranges(T, up.window, up.overlap)[1:]:
        near[(s - 1) * 512 : (s + 1) * 512] = True
    assert bool(torch.isfinite(y).all())
    assert float(steps[near].max()) <= float(steps[~near].max())


def test_network_never_sees_more_than_a_window(checkpoint):
    up = upsampler(checkpoint, window_seconds=0.5, overlap_seconds=0.1, batch_size=3)
    shapes = []
    forward = up.model.forward
    up.model.forward = lambda x_t, *a, **k: shapes.append(tuple(x_t.shape)) or forward(x_t, *a, **k)
    x = clip(20.0, sr=16000, channels=2)
    res = up.upsample(x, 16000, steps=1, cfg_scale=1.0)
    assert res.audio.shape == (2, output_length(x.shape[-1], 16000))
    assert max(s[0] for s in shapes) <= 3 and max(s[2] for s in shapes) <= up.window
    frames = -(-res.audio.shape[-1] // 512)
    assert len(shapes) >= 2 * frames / up.window / 3  # the whole file was processed, window by window


def test_seed_reproducible_and_independent_of_batching(checkpoint):
    x, other = clip(1.5, 22050, channels=2), clip(0.7, 16000, seed=4)
    kw = dict(steps=2, cutoff="auto")
    up = upsampler(checkpoint, window_seconds=0.5, overlap_seconds=0.1)
    a = up.upsample(x, 22050, seed=3, **kw).audio
    assert torch.equal(a, up.upsample(x, 22050, seed=3, **kw).audio)
    assert not torch.allclose(a, up.upsample(x, 22050, seed=4, **kw).audio, atol=1e-4)
    # one window per call, or sharing batches with another file: the same result
    alone = upsampler(checkpoint, window_seconds=0.5, overlap_seconds=0.1, batch_size=1)
    assert torch.allclose(a, alone.upsample(x, 22050, seed=3, **kw).audio, atol=1e-5)
    results = dict(up.upsample_many([("o", other, 16000), ("x", x, 22050)], seed=3, **kw))
    assert torch.allclose(a, results["x"].audio, atol=1e-5)


def test_low_frequency_replacement_keeps_the_input_band(checkpoint):
    up = upsampler(checkpoint)
    x = apply_degradation(clip(2.0), SR, Degradation(6000.0, "ellip", 6))

    def low_band_error(y):
        s = lambda v: torch.stft(v, 2048, 512, window=torch.hann_window(2048), return_complex=True)  # noqa: E731
        low = torch.arange(1025) * SR / 2048 < 0.85 * 6000
        return float((s(y) - s(x))[:, low].abs().pow(2).sum() / s(x)[:, low].abs().pow(2).sum())

    on = up.upsample(x, SR, steps=2, cutoff=6000.0)
    off = up.upsample(x, SR, steps=2, cutoff=6000.0, lfr=False)
    assert low_band_error(on.audio) < 1e-4 < 0.1 < low_band_error(off.audio)
    assert not torch.allclose(on.audio, x, atol=1e-4)  # the model's band is there above the cutoff


def test_multichannel_layout_kept(checkpoint):
    t = torch.arange(int(1.2 * 16000)) / 16000
    x = torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in (300.0, 700.0, 1100.0)])  # [3, L]
    y = upsampler(checkpoint).upsample(x, 16000, steps=1).audio
    assert y.shape == (3, output_length(x.shape[-1], 16000))
    peaks = torch.fft.rfft(y, dim=-1).abs().argmax(-1) * SR / y.shape[-1]  # [3] Hz
    assert torch.allclose(peaks, torch.tensor([300.0, 700.0, 1100.0]), atol=5)


def test_digital_silence_stays_exactly_silent(tmp_path, capsys, checkpoint):
    up = upsampler(checkpoint, window_seconds=0.4, overlap_seconds=0.1)
    res = up.upsample(torch.zeros(1, 16000), 16000, steps=2)
    assert res.audio.shape == (1, SR) and not res.audio.any()  # mono: every sample exactly 0.0
    x = clip(1.3, 16000, channels=2)
    x[1] = 0.0  # a stereo file with one silent channel (windowed: several windows per channel)
    y = up.upsample(x, 16000, steps=2).audio
    assert not y[1].any() and bool((y[0].abs() > 0).any())
    sf.write(tmp_path / "silence.wav", np.zeros(8000, np.float32), 16000)  # what the user ran
    rc, out, err = run_cli(capsys, tmp_path / "silence.wav", "--checkpoint", checkpoint, "--steps", "2")
    assert rc == 0, err
    assert not sf.read(tmp_path / "silence_jat.wav")[0].any()


def high_band_ratio(y: torch.Tensor, x: torch.Tensor, cutoff: float) -> float:
    """Energy of y above `cutoff` over the energy of x (both [C, L] at 44.1 kHz)."""
    spec = torch.fft.rfft(y.double(), dim=-1).abs().square()
    high = torch.fft.rfftfreq(y.shape[-1], 1 / SR) > cutoff
    return float(spec[:, high].sum() / x.double().square().sum() * 2 / y.shape[-1])


@pytest.mark.parametrize("g", [2.0**-10, 2.0**-13])
def test_output_scales_with_the_input_level(checkpoint, g):
    """upsample(g * x) == g * upsample(x). Tolerance: none. g is a power of two, and scaling by a power
    of two is exact in binary floating point (short of underflow, far away here): resampling, the
    STFTs of the low-frequency replacement and the division by the gain are linear and so scale
    exactly, the gain is exactly 1 / g times larger, so the network sees the same bits."""
    up = upsampler(checkpoint)
    x = apply_degradation(clip(1.2), SR, Degradation(6000.0, "butter", 8))  # [1, L]
    x = x * (0.1 / x.square().mean().sqrt())  # -20 dBFS RMS; g * x is at -80 (2^-10) or -98 dBFS
    kw = dict(steps=2, cutoff=6000.0)
    loud, quiet = up.upsample(x, SR, **kw).audio, up.upsample(x * g, SR, **kw).audio
    assert torch.equal(quiet, loud * g)
    ratio = high_band_ratio(loud, x, 6000.0)
    assert ratio > 10 * high_band_ratio(x, x, 6000.0)  # the model did add a band above the cutoff ...
    assert high_band_ratio(quiet, x * g, 6000.0) == ratio  # ... as strong relative to a quiet input


def test_ema_weights_by_default_and_precision(checkpoint):
    tensors = load_file(str(checkpoint / "weights.safetensors"))
    for ema, prefix in ((True, "ema."), (False, "model.")):
        state = upsampler(checkpoint, ema=ema).model.state_dict()
        assert all(torch.equal(v, tensors[prefix + k]) for k, v in state.items())
    x = clip(1.0, 16000)
    fp32 = upsampler(checkpoint).upsample(x, 16000, steps=2).audio
    bf16 = upsampler(checkpoint, precision="bf16")
    assert bf16.dtype == torch.bfloat16
    y = bf16.upsample(x, 16000, steps=2).audio
    assert y.shape == fp32.shape and float((y - fp32).pow(2).mean() / fp32.pow(2).mean()) < 0.01


def test_checkpoint_config_mismatch_is_one_clear_line(tmp_path, capsys, checkpoint):
    deeper = Config.from_yaml(ROOT / "configs" / "tiny.yaml", ["model.depth=3"])
    bad = make_checkpoint(tmp_path / "bad", ["model.depth=2"], weights_from=deeper)
    with pytest.raises(ckpt.CheckpointError, match="do not fit the stored config: .*unexpected"):
        Upsampler.from_checkpoint(bad, device="cpu")
    wav = tmp_path / "a.wav"
    sf.write(wav, clip(0.5, 16000)[0].numpy(), 16000)
    rc, _, err = run_cli(capsys, wav, "--checkpoint", bad)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err and "blocks.2" in err
    assert not (tmp_path / "a_jat.wav").exists()
    with pytest.raises(ckpt.CheckpointError, match="'mdct' gives 256 latent channels, the model expects 512"):
        Upsampler.from_checkpoint(checkpoint, device="cpu", codec=MDCTCodec(hop=256))
    rc, _, err = run_cli(capsys, wav, "--checkpoint", tmp_path / "nowhere")
    assert rc == 2 and "no checkpoint here" in err


# --- files and the command line ------------------------------------------------------------------------


def test_cli_rates_formats_channels_and_durations(tmp_path, capsys, checkpoint):
    cases = {  # name: (rate, channels, samples, subtype) with odd lengths
        "r8k.wav": (8000, 1, 8001, "PCM_U8"), "r11k.wav": (11025, 2, 11027, "PCM_16"),
        "r16k.flac": (16000, 1, 12345, "PCM_24"), "r22k.ogg": (22050, 2, 22051, "VORBIS"),
        "r48k.wav": (48000, 3, 24001, "FLOAT"), "r96k.wav": (96000, 1, 48003, "PCM_24"),
    }
    src = tmp_path / "in"
    for i, (name, (sr, ch, n, subtype)) in enumerate(cases.items()):
        (src / "sub").mkdir(parents=True, exist_ok=True)
        x = clip(n / sr + 0.01, sr, ch, seed=i)[:, :n].T.numpy()
        sf.write(src / ("sub" if i % 2 else "") / name, x * 0.8, sr, subtype=subtype)
    rc, out, err = run_cli(capsys, src, "--checkpoint", checkpoint, "--output-dir", tmp_path / "out",
                           "--steps", "1", "--plot")
    assert rc == 0, err
    for i, (name, (sr, ch, _, subtype)) in enumerate(cases.items()):
        stem = Path(name).stem
        written = tmp_path / "out" / ("sub" if i % 2 else "") / f"{stem}_jat.wav"
        n_in = sf.info(str(src / ("sub" if i % 2 else "") / name)).frames
        info = sf.info(str(written))
        assert (info.samplerate, info.channels, info.frames) == (SR, ch, output_length(n_in, sr)), name
        assert info.subtype == {"FLOAT": "FLOAT", "PCM_24": "PCM_24"}.get(subtype, "PCM_16")
        assert written.with_suffix(".png").stat().st_size > 1000
    assert out.count("RTF") == len(cases) + 1 and "network" in out and "codec" in out
    assert "done: 6 written, 0 failed" in out


def test_cli_bad_files_reported_good_files_written(tmp_path, capsys, checkpoint):
    good = clip(0.6, 16000)[0].numpy()
    sf.write(tmp_path / "good.wav", good, 16000)
    sf.write(tmp_path / "good2.flac", good, 16000)
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all" * 20)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "short.wav", good[:100], 16000)
    nan = good.copy()
    nan[50] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    names = ["good.wav", "garbage.wav", "empty.wav", "missing.wav", "short.wav", "nan.wav", "good2.flac"]
    rc, out, err = run_cli(capsys, *[tmp_path / n for n in names], "--checkpoint", checkpoint, "--steps", "1")
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("error: ") for line in lines)
    expect = {"garbage.wav": "not a readable audio file", "empty.wav": "empty", "missing.wav": "not found",
              "short.wav": "too short", "nan.wav": "1 NaN/Inf samples"}
    for name, phrase in expect.items():
        assert sum(name in line and phrase in line for line in lines) == 1, (name, lines)
    assert sf.info(str(tmp_path / "good_jat.wav")).frames == output_length(len(good), 16000)
    assert (tmp_path / "good2_jat.wav").is_file()
    assert "done: 2 written, 5 failed" in out
    assert not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob("nan_jat*"))


def test_cli_never_overwrites_inputs_or_existing_outputs(tmp_path, capsys, checkpoint):
    x = clip(0.6, 16000)[0].numpy()
    sf.write(tmp_path / "song.wav", x, 16000)
    sf.write(tmp_path / "take.wav", x, 16000)
    sf.write(tmp_path / "take_jat.wav", x[:2000], 16000)  # an input that is also take.wav's output name
    (tmp_path / "song_jat.wav").write_bytes(b"keep me")
    args = ["--checkpoint", checkpoint, "--steps", "1"]
    inputs = [tmp_path / "song.wav", tmp_path / "take.wav", tmp_path / "take_jat.wav"]
    rc, out, err = run_cli(capsys, *inputs, *args)
    assert rc == 1
    assert "song_jat.wav exists (pass --overwrite" in err and "is an input file" in err
    assert (tmp_path / "song_jat.wav").read_bytes() == b"keep me"
    assert sf.info(str(tmp_path / "take_jat.wav")).frames == 2000
    assert (tmp_path / "take_jat_jat.wav").is_file()  # named explicitly, so it is upsampled too
    rc, _, err = run_cli(capsys, *inputs, *args, "--overwrite")
    assert rc == 1 and "take_jat.wav is an input file" in err  # even --overwrite never writes over an input
    assert sf.info(str(tmp_path / "take_jat.wav")).frames == 2000
    assert sf.info(str(tmp_path / "song_jat.wav")).samplerate == SR
    # the write itself never replaces a file that appeared after planning, and leaves no partial file
    (tmp_path / "late.wav").write_bytes(b"arrived late")
    with pytest.raises(AudioError, match="late.wav: exists"):
        write_output(tmp_path / "late.wav", torch.zeros(1, 100), "PCM_16")
    assert (tmp_path / "late.wav").read_bytes() == b"arrived late" and not list(tmp_path.glob(".*partial*"))
    (tmp_path / "late.wav").unlink()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "song_jat.wav").stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's 0600
    # a folder scan skips earlier outputs, so a second run does not make *_jat_jat files
    (tmp_path / "take_jat_jat.wav").unlink()
    rc, out, _ = run_cli(capsys, tmp_path, *args, "--overwrite", "--format", "flac")
    assert rc == 0 and "done: 2 written" in out
    assert sorted(p.name for p in tmp_path.glob("*_jat.flac")) == ["song_jat.flac", "take_jat.flac"]


def test_cli_globs_and_cutoff_option(tmp_path, capsys, checkpoint):
    x = clip(0.6, 44100)[0].numpy()
    for name in ("a.wav", "b.wav", "c.flac"):
        sf.write(tmp_path / name, x, 44100)
    rc, out, _ = run_cli(capsys, str(tmp_path / "*.wav"), "--checkpoint", checkpoint, "--steps", "1",
                         "--cutoff", "12k", "--seed", "3", "--solver", "euler", "--cfg", "1.5")
    assert rc == 0 and "done: 2 written" in out and out.count("cutoff 12.00 kHz (given)") == 2
    assert not (tmp_path / "c_jat.wav").exists()
    with pytest.raises(SystemExit):
        infer.build_parser().parse_args(["a.wav", "--checkpoint", "x", "--cutoff", "loud"])


@pytest.mark.slow
def test_script_end_to_end_as_a_user_runs_it(tmp_path, checkpoint):
    sf.write(tmp_path / "voice.wav", clip(2.0, 16000, channels=2).T.numpy() * 0.5, 16000)
    cmd = [sys.executable, "scripts/infer.py", str(tmp_path / "voice.wav"),
           "--checkpoint", str(checkpoint.parent), "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RTF" in proc.stdout and sf.info(str(tmp_path / "voice_jat.wav")).channels == 2
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "exists" in proc.stderr


# --- failures named before the work, and their causes -------------------------------------------------


def test_unusable_output_dir_is_refused_before_the_checkpoint_is_loaded(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", clip(0.3, 16000)[0].numpy(), 16000)
    (tmp_path / "out").write_text("a file where the folder should be")
    # a missing checkpoint would be reported first if it were loaded first
    rc, out, err = run_cli(capsys, tmp_path / "a.wav", "--checkpoint", tmp_path / "nowhere",
                           "--output-dir", tmp_path / "out")
    assert rc == 2 and err == f"error: {tmp_path / 'out'}/: --output-dir is a file, not a folder\n"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = run_python("scripts/infer.py", tmp_path / "a.wav", "--checkpoint", tmp_path / "nowhere",
                      "--output-dir", locked, prefix=without_root_powers())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {locked}/: cannot write here (Permission denied)\n"
    assert list(locked.iterdir()) == []  # the probe left nothing behind


PLAN_ERRORS = "import sys; from pathlib import Path; from jat.infer.files import plan; " \
              "print(plan([(Path(a), None) for a in sys.argv[1:]])[1])"


def test_output_folders_are_checked_and_created_in_planning(tmp_path):
    ok, sub = tmp_path / "ok", tmp_path / "ro" / "sub"
    for folder in (ok, sub):
        folder.mkdir(parents=True)
        sf.write(folder / "x.wav", np.zeros(800, np.float32), 16000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where a sub-folder of --output-dir should be")
    # below --output-dir: a missing sub-folder is created, one that is a file is named
    tasks, errors = plan([(ok / "x.wav", tmp_path), (sub / "x.wav", sub.parent)], out)
    assert [t.output for t in tasks] == [out / "ok" / "x_jat.wav"] and (out / "ok").is_dir()
    assert errors == [f"{sub / 'x.wav'}: output folder {out / 'sub'}/: is a file, not a folder"]
    # beside the input: its folder must take new files (probed for real, with file permissions binding)
    sub.chmod(0o555)
    proc = run_python("-c", PLAN_ERRORS, ok / "x.wav", sub / "x.wav", prefix=without_root_powers())
    assert proc.returncode == 0, proc.stderr
    expect = f"{sub / 'x.wav'}: output folder {sub}/: cannot write here (Permission denied)"
    assert proc.stdout.strip() == repr([expect + "; pass --output-dir to write elsewhere"])


def test_non_finite_output_names_the_network_not_the_file(tmp_path, capsys, checkpoint, monkeypatch):
    from jat.infer.upsampler import UpsampleError

    load = Upsampler.from_checkpoint

    def broken(*args, **kwargs):  # weights that load but compute NaN, as a diverged checkpoint does
        up = load(*args, **kwargs)
        up.model.forward = lambda x_t, *a, **k: x_t * float("nan")
        return up

    monkeypatch.setattr(infer.Upsampler, "from_checkpoint", broken)
    sf.write(tmp_path / "a.wav", clip(0.3, 16000)[0].numpy(), 16000)
    rc, out, err = run_cli(capsys, tmp_path / "a.wav", "--checkpoint", checkpoint, "--steps", "1",
                           "--precision", "bf16")
    assert rc == 1 and "done: 0 written, 1 failed" in out
    assert err == (f"error: {tmp_path / 'a.wav'}: the network produced non-finite values (checkpoint "
                   f"{checkpoint}; try --precision fp32 or another checkpoint)\n")
    assert list(tmp_path.iterdir()) == [tmp_path / "a.wav"]  # no output, no temporary file
    fp32 = broken(checkpoint, device="cpu", precision="fp32")
    with pytest.raises(UpsampleError, match=r"non-finite values \(checkpoint .*; try another checkpoint\)$"):
        fp32.upsample(clip(0.3, 16000), 16000, steps=1)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_guidance_scale_is_refused(capsys, checkpoint, value):
    with pytest.raises(SystemExit) as info:
        infer.build_parser().parse_args(["a.wav", "--checkpoint", "x", f"--cfg={value}"])
    assert info.value.code == 2
    assert f"argument --cfg: must be a finite number, got {value}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"guidance scale .*must be a finite number, got {value}"):
        upsampler(checkpoint).upsample(clip(0.3, 16000), 16000, steps=1, cfg_scale=float(value))


def test_odd_settings_warn_once_before_the_work_and_go_on(tmp_path, capsys, checkpoint, monkeypatch):
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, clip(0.06, 16000)[0].numpy(), 16000)
    cfg_steps = Upsampler.from_checkpoint(checkpoint, device="cpu").cfg.flow.steps  # the default, 32
    seen = []  # stderr when the work starts
    work = infer.upsample_files

    def spy(*args, **kwargs):
        seen.append(capsys.readouterr().err)
        return work(*args, **kwargs)

    monkeypatch.setattr(infer, "upsample_files", spy)
    args = [tmp_path / "a.wav", tmp_path / "b.wav", "--checkpoint", checkpoint, "--solver", "euler"]
    rc, out, err = run_cli(capsys, *args, "--steps", "257", "--cfg", "-5", "--cutoff", "10")
    assert rc == 0 and "done: 2 written, 0 failed" in out and err == ""  # warned, then carried on
    warned = seen[0].splitlines()
    assert warned == [
        f"warning: --steps 257: more than 256 steps rarely helps and takes {257 / cfg_steps:.0f} x longer "
        f"than the default {cfg_steps}",
        "warning: --cfg -5: a guidance scale below 1 weakens the input's hold on the result (0 ignores the "
        "input, a negative scale pushes away from it); the usual range is 1-10",
        "warning: --cutoff 10 Hz is below the 2000-16000 Hz range the model was trained on; everything above "
        "it is regenerated",
    ]
    # the user's own flags (no work: both outputs exist now), and the other ends of the ranges
    rc, _, err = run_cli(capsys, *args, "--steps", "100000", "--cfg", "50", "--cutoff", "20k")
    err = seen[-1] + err
    assert rc == 1 and err.count("warning: ") == 3
    assert "--steps 100000: more than 256 steps rarely helps and takes 3125 x longer" in err
    assert "--cfg 50: a guidance scale above 10 exaggerates the guidance" in err
    assert "--cutoff 20000 Hz is above the 2000-16000 Hz range the model was trained on" in err
    rc, _, err = run_cli(capsys, *args, "--steps", "256", "--cfg", "1", "--cutoff", "8k")
    assert len(seen) == 3 and "warning" not in seen[-1] + err


def test_killed_writers_leftovers_are_removed_in_planning(tmp_path, capsys, checkpoint):
    sf.write(tmp_path / "song.wav", clip(0.3, 16000)[0].numpy(), 16000)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, mine = tmp_path / f".song_jat.{dead.pid}.tmp.wav", tmp_path / f".song_jat.{os.getpid()}.tmp.wav"
    for leftover in (stale, mine, tmp_path / f".song_jat.{dead.pid}.tmp.png"):
        leftover.write_bytes(b"partial")
    tasks, errors = plan([(tmp_path / "song.wav", None)])
    assert len(tasks) == 1 and not errors
    assert not stale.exists() and mine.exists()  # a dead writer's file goes, a live one's never
    assert (tmp_path / f".song_jat.{dead.pid}.tmp.png").exists()  # not an output of this plan (no --plot)
    mine.unlink()
    # a writer killed mid-write (SIGKILL: no clean-up can run) leaves its file; the next run removes it
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, tmp_path / "song_jat.wav"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    leftover = tmp_path / f".song_jat.{proc.pid}.tmp.wav"
    assert leftover.read_bytes() == b"RIFF half a header" and not (tmp_path / "song_jat.wav").exists()
    rc, out, err = run_cli(capsys, tmp_path / "song.wav", "--checkpoint", checkpoint, "--steps", "1")
    assert rc == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".song_jat.{dead.pid}.tmp.png", "song.wav", "song_jat.wav"]


STUCK_WRITER = """
import sys, time, numpy, soundfile
from pathlib import Path
from jat.data.audio import save_audio

def stuck(file, *args, **kwargs):  # half a file written, then the process hangs until it is killed
    Path(file).write_bytes(b"RIFF half a header")
    print("writing", flush=True)
    time.sleep(120)

soundfile.write = stuck
save_audio(sys.argv[1], numpy.zeros(100, numpy.float32), 44100)
"""
