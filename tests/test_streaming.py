"""Streaming files (jat/infer/stream.py), coherent stereo, output rates, and memory flat in length."""

import math
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import ROOT, make_checkpoint
from torch import nn

from jat.codecs import DACCodec, LatentNorm
from jat.codecs.latent import LatentSpace
from jat.config import Config
from jat.data.audio import level_gain
from jat.data.degrade import Degradation, apply_degradation
from jat.data.synth import demo_clip
from jat.infer import stream
from jat.infer.blocks import Local
from jat.infer.channels import ChannelMeter, measure
from jat.infer.rates import rate_length
from jat.infer.stream import upsample_file
from jat.infer.upsampler import Upsampler
from jat.model.flow import FlowMatching

SR = 44100
# Tolerance of streaming against the whole-file path, relative to the output's peak. Both compute every
# output sample from the same inputs through the same operations; only the extents over which vectorised
# kernels run differ, which can change float32 rounding (2^-24 relative per operation, some tens of
# operations per stage). The network carries such differences in its input into its output with a gain
# of order its depth times its sampler steps (a few, for these random tiny models), so 1e-4 leaves a
# margin of over 100x above rounding, while joins that lack the codec's context differ by about 5e-3
# (measured; checked below to exceed 10x the tolerance).
STREAM_TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def upsampler(checkpoint, **kw) -> Upsampler:
    kw = {"window_seconds": 0.5, "overlap_seconds": 0.1, **kw}
    return Upsampler.from_checkpoint(checkpoint, device="cpu", precision="fp32", **kw)


def signal(seconds: float, sr: int, channels: int = 2, cutoff: float = 4000.0) -> torch.Tensor:
    """[C, L] at sr: band-limited demo clips, a different one per channel."""
    n = round(seconds * sr)
    x = torch.stack([torch.from_numpy(demo_clip(seconds + 0.1, SR, seed=k)).float() for k in range(channels)])
    x = apply_degradation(x, SR, Degradation(cutoff, "butter", 8))
    if sr != SR:
        from jat.data.audio import resample
        x = resample(x, SR, sr)
    return (x[:, :n] * torch.linspace(0.8, 0.3, channels)[:, None]).contiguous()


def write(path: Path, x: torch.Tensor, sr: int) -> Path:
    sf.write(path, x.T.numpy(), sr, subtype="FLOAT")  # float: the file holds the tensor's bits
    return path


def streamed(up, path, **kw) -> tuple[torch.Tensor, object]:
    out = []
    res = upsample_file(up, path, out.append, **kw)
    return torch.cat(out, -1), res


# --- streaming equals the whole-file path ---------------------------------------------------------------


@pytest.mark.parametrize("sr,rate", [(SR, None), (22050, 48000), (48000, "input")])
def test_stream_equals_whole_file(tmp_path, checkpoint, sr, rate):
    up = upsampler(checkpoint)
    x = signal(3.2, sr)
    kw = dict(steps=2, cutoff=4000.0, seed=3)
    whole = up.upsample(x, sr, output_rate=rate, **kw).audio
    y, res = streamed(up, write(tmp_path / "x.wav", x, sr), block_seconds=0.37, rate=rate, **kw)
    frames = -(-whole.shape[-1] * SR // res.sample_rate // 512)
    assert frames > 5 * up.window  # several windows, and blocks shorter than a window
    assert y.shape == whole.shape == (2, rate_length(x.shape[-1], sr, res.sample_rate))
    assert float((y - whole).abs().max()) <= STREAM_TOL * float(whole.abs().max())


def test_stream_joins_need_their_context(tmp_path, checkpoint, monkeypatch):
    """The equality above has teeth: without the codec's context the blocks no longer join."""
    up = upsampler(checkpoint)
    x = signal(2.0, SR)
    kw = dict(steps=2, cutoff=4000.0)
    whole = up.upsample(x, SR, **kw).audio
    monkeypatch.setattr(stream, "codec_context", lambda codec: 0)
    y, _ = streamed(up, write(tmp_path / "x.wav", x, SR), block_seconds=0.37, **kw)
    assert float((y - whole).abs().max()) > 10 * STREAM_TOL * float(whole.abs().max())


class LocalDenoiser(nn.Module):
    """An x-predictor over 3 neighbouring frames, for any latent width (here the tiny DAC's)."""

    def __init__(self, c: int):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv1d(2 * c, c, 3, padding=1)

    def forward(self, x_t, t, c, mask=None):
        return self.conv(torch.cat([x_t, c], 1)) * (1 + t[:, None, None])  # [B, C, T]


def test_stream_equals_whole_file_with_dac(tmp_path, tiny_dac):
    """DAC blocks join through its computed receptive field (`DACCodec.context_frames`)."""
    codec = DACCodec(tiny_dac)
    latents = LatentSpace(codec, LatentNorm.identity(codec.latent_dim))
    flow = FlowMatching(Config.from_yaml(ROOT / "configs" / "tiny.yaml").flow)
    up = Upsampler(LocalDenoiser(codec.latent_dim), latents, flow, window_seconds=0.5, overlap_seconds=0.1)
    x = signal(2.5, 16000, channels=1)
    whole = up.upsample(x, 16000, steps=2, cutoff=4000.0).audio
    y, _ = streamed(up, write(tmp_path / "x.wav", x, 16000), block_seconds=0.3, steps=2, cutoff=4000.0)
    assert codec.context_frames < round(0.3 * latents.frame_rate) * 4  # blocks really are short
    assert float((y - whole).abs().max()) <= STREAM_TOL * float(whole.abs().max())


def test_cutoff_of_a_long_file_is_the_whole_file_definition(tmp_path):
    x = signal(35.0, 8000, channels=1, cutoff=3000.0)  # longer than CUTOFF_SECONDS: read as excerpts
    path = write(tmp_path / "long.wav", x, 8000)
    from jat.infer.band import estimate_cutoff
    assert stream.file_cutoff(path, 8000, 1, x.shape[-1], "auto") == estimate_cutoff(x, 8000)


# --- channels -------------------------------------------------------------------------------------------


def test_meter_over_blocks_is_level_gain_and_finds_copies():
    x = signal(1.0, 16000, channels=3)
    x[2] = x[0]
    meter = ChannelMeter(3)
    for a in range(0, x.shape[-1], 777):
        meter.update(x[:, a : a + 777])
    # float64 sums in another order: the float32 gains agree to their last bit or next to it
    assert torch.allclose(meter.gain, level_gain(x), rtol=2**-22, atol=0)
    assert meter.source == [0, 1, 0] and measure(torch.zeros(2, 100)).gain.tolist() == [0.0, 0.0]


def test_dual_mono_stays_bit_identical(tmp_path, checkpoint):
    up = upsampler(checkpoint)
    mono = signal(1.5, 16000, channels=1)
    dual = mono.expand(2, -1).contiguous()
    kw = dict(steps=2, cutoff=4000.0)
    whole = up.upsample(dual, 16000, **kw).audio
    y, _ = streamed(up, write(tmp_path / "dual.wav", dual, 16000), block_seconds=0.4, **kw)
    for out in (whole, y):
        assert torch.equal(out[0], out[1])
    # the copy is the mono file's own result (computed once, for both channels)
    assert torch.equal(whole[0], up.upsample(mono, 16000, **kw).audio[0])


def generated(y: torch.Tensor, cutoff: float, sr: int = SR) -> torch.Tensor:
    """The band of y [C, L] above 1.1 x cutoff (where low-frequency replacement leaves the model alone)."""
    spec = torch.fft.rfft(y.double(), dim=-1)
    spec[:, torch.fft.rfftfreq(y.shape[-1], 1 / sr) < 1.1 * cutoff] = 0
    return torch.fft.irfft(spec, n=y.shape[-1], dim=-1)  # [C, L]


@pytest.mark.parametrize("a,b", [(0.8, 0.4), (math.cos(0.5), math.sin(0.5))])
def test_panned_source_keeps_its_place(tmp_path, checkpoint, a, b):
    """L = a s, R = b s: both channels reach the network at the same level from the same noise, so the
    generated band is the same signal scaled by a and b: its L/R power ratio is a^2 / b^2.

    Tolerance: with b = a / 2 the two level-normalised inputs are bit-identical (scaling by a power of two
    is exact, and the float64 gain scales exactly with it), so only batched arithmetic on two rows could
    differ. For a pan law (cos, sin) the inputs differ by float32 rounding of a s and b s (2^-24 relative),
    carried through resampling, codec and network; 1e-3 on the ratio (0.004 dB) is over 1000x that
    (measured: 1.3e-6), and 1e-6 on the energy of the difference of the two generated bands likewise
    (measured: 2e-9). A noise of its own per channel, as before, measured a ratio off by 1.9 % and
    generated bands differing by 64 % of their energy: the image smeared."""
    up = upsampler(checkpoint)
    s = signal(1.5, SR, channels=1)[0]
    x = torch.stack([a * s, b * s]) if b != a / 2 else torch.stack([a * s, a * s * 0.5])
    y, _ = streamed(up, write(tmp_path / "pan.wav", x, SR), block_seconds=0.4, steps=2, cutoff=4000.0)
    g = generated(y, 4000.0)  # [2, L]
    power = g.square().sum(-1)  # [2]
    assert float(power[0]) > 1e-6 * float(x[0].double().square().sum())  # the model did add a band
    assert abs(float(power[0] / power[1]) / (a / b) ** 2 - 1) < 1e-3
    # not only the power: the same generated signal in both channels (the source is where it was)
    diff = (g[0] / a - g[1] / b).square().sum() / (g[0] / a).square().sum()
    assert float(diff) < 1e-6


# --- output rates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000, 96000])
def test_exact_output_length_at_every_rate(tmp_path, checkpoint, sr):
    up = upsampler(checkpoint, window_seconds=0.3)
    for n in (round(0.23 * sr) + 1, round(0.41 * sr) + 3):
        x = signal(n / sr + 0.01, sr, channels=1)[:, :n]
        path = write(tmp_path / f"x{n}.wav", x, sr)
        for rate in (None, 48000, "input"):
            y, res = streamed(up, path, block_seconds=0.1, steps=1, rate=rate)
            expect = rate_length(n, sr, res.sample_rate)  # ceil(n * R / sr): the input's duration
            assert res.sample_rate == {None: SR, 48000: 48000, "input": max(sr, SR)}[rate]
            assert y.shape == (1, expect) == tuple(up.upsample(x, sr, steps=1, output_rate=rate).audio.shape)


def test_low_band_at_the_output_rate_is_the_input(tmp_path, checkpoint):
    """At the input's rate (48 kHz) the band below the cutoff is the input's own spectrum, not a
    resampled copy of it; the model's band above is there."""
    up = upsampler(checkpoint)
    x = signal(1.5, 48000, channels=1, cutoff=6000.0)
    y, res = streamed(up, write(tmp_path / "x.wav", x, 48000), steps=2, cutoff=6000.0, rate="input")
    assert res.sample_rate == 48000 and y.shape == x.shape

    def spec(v):
        return torch.stft(v, 2048, 512, window=torch.hann_window(2048), return_complex=True)

    low = torch.arange(1025) * 48000 / 2048 < 0.85 * 6000
    err = (spec(y) - spec(x))[:, low].abs().square().sum() / spec(x)[:, low].abs().square().sum()
    assert float(err) < 1e-4
    assert float(generated(y, 6000.0, 48000).square().mean()) > 0


# --- memory ---------------------------------------------------------------------------------------------


def test_what_the_stream_holds_does_not_grow_with_length(tmp_path, checkpoint, monkeypatch):
    up = upsampler(checkpoint)
    held = {}
    make = stream.UpsampleStream

    def spy(*a, **k):
        s = make(*a, **k)
        held[a[2]] = s
        return s

    monkeypatch.setattr(stream, "UpsampleStream", spy)
    for seconds in (6.0, 18.0):
        x = signal(seconds, 16000, channels=2)
        streamed(up, write(tmp_path / f"x{seconds}.wav", x, 16000), block_seconds=0.5, steps=1,
                 cutoff=4000.0, rate=48000)
    short, long = (held[k].held for k in sorted(held))
    assert short.keys() == long.keys() and "windows" in long
    assert all(long[k] <= short[k] for k in long), (short, long)  # the same bound for 3x the length
    assert short["resample"] < 6.0 * 16000 / 4  # and far from the whole input even for the short file


def test_overlap_save_of_any_pieces_equals_one_shot():
    """The Local stage itself: a non-causal local operation (a 5-tap smoothing) through blocks of 7 units
    of 3 samples, fed in ragged pieces, equals the operation on the whole signal."""
    x = torch.randn(2, 1000, dtype=torch.float64)

    def op(seg):  # reaches 2 samples either side: one unit of context is enough
        kernel = torch.ones(1, 1, 5, dtype=seg.dtype) / 5
        return torch.nn.functional.conv1d(seg[:, None], kernel, padding=2)[:, 0]

    whole = op(x)
    stage, outs, i = Local(op, 1000, 1000, 3, 3, 1, 7), [], 0
    for n in [1, 50, 2, 333, 1, 613]:
        y = stage.push(x[:, i : i + n])
        i += n
        if y is not None:
            outs.append(y)
    assert stage.finished and torch.equal(torch.cat(outs, -1), whole)
    assert stage.held <= (7 + 2) * 3 + 613
