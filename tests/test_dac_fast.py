"""The fast DAC (jat/codecs/dac_fast.py) computes the library's function, and the codec and end-to-end
benchmarks measure what they say (jat/evaluation/codec_speed.py, jat/evaluation/rtf.py)."""

from __future__ import annotations

import math

import pytest
import soundfile as sf
import torch
from torch import nn

import jat.codecs.dac_fast as dac_fast
from jat.codecs import DACCodec
from jat.codecs.dac_fast import CL, Conv, Snake, Tiled, Upsample, fast_dac, folded_weight
from jat.evaluation.codec_speed import count_flops, dac_flops_per_frame

EPS = torch.finfo(torch.float32).eps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def rounding_bound(model: nn.Module) -> float:
    """How far two fp32 evaluations of the same network may differ when only the order of each sum differs:
    each convolution's sum of n products carries about sqrt(n) eps of relative rounding, and independent
    errors of `layers` convolutions add in quadrature; 4x that as the bound (a wrong tap, phase or halo
    gives an error of order 1)."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    n = max(m.weight.shape[1 if isinstance(m, nn.Conv1d) else 0] * m.kernel_size[0] for m in convs)
    return 4 * math.sqrt(len(convs) * n) * EPS


def channels_last(x: torch.Tensor) -> torch.Tensor:  # [B, C, L] -> [B, C, 1, L] channels-last
    return x[:, :, None].contiguous(memory_format=CL)


# --- the layers ----------------------------------------------------------------------------------------


SHAPES = [(16, 8, 4), (4, 2, 1), (8, 4, 2), (7, 3, 2), (5, 2, 0), (3, 4, 1), (8, 4, 3)]  # (K, s, p)


@pytest.mark.parametrize("K,s,p", SHAPES)
def test_polyphase_layers_equal_torch_convolutions(K, s, p):
    """Transposed and strided convolutions in polyphase form give torch's outputs, lengths included, for
    DAC's shapes (K = 2s, p = s/2) and others (odd strides, kernels shorter than the stride, other pads)."""
    g = torch.Generator().manual_seed(K * 10 + s)
    up, down = nn.ConvTranspose1d(6, 5, K, stride=s, padding=p), nn.Conv1d(6, 5, K, stride=s, padding=p)
    for x in (torch.randn(2, 6, 11, generator=g), torch.randn(1, 6, 37, generator=g)):
        with torch.no_grad():
            ref, y = up(x), Upsample(up, torch.float32)(channels_last(x))[:, :, 0]  # [B, 5, L']
            assert y.shape == ref.shape
            torch.testing.assert_close(y, ref, rtol=0, atol=16 * EPS * float(ref.abs().max()))
            ref, y = down(x), Conv(down, torch.float32)(channels_last(x))[:, :, 0]
            assert y.shape == ref.shape
            torch.testing.assert_close(y, ref, rtol=0, atol=16 * EPS * float(ref.abs().max()))


def test_folded_weight_is_the_weight_the_library_computes_before_each_call(tiny_dac):
    convs = [m for m in tiny_dac.decoder.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    assert all(hasattr(m, "weight_g") for m in convs)  # the library's weight norm, hook form
    with torch.no_grad():
        tiny_dac.decode(torch.randn(1, tiny_dac.latent_dim, 3))  # each hook sets .weight for its call
    for m in convs:
        assert torch.equal(folded_weight(m), m.weight)


def test_snake_is_the_library_snake():
    from dac.nn.layers import Snake1d

    snake = Snake1d(8)
    with torch.no_grad():
        snake.alpha.uniform_(0.2, 3.0)
        x = 3 * torch.randn(2, 8, 100)
        ref, y = snake(x), Snake(snake, torch.float32)(channels_last(x))[:, :, 0]
    torch.testing.assert_close(y, ref, rtol=2 * EPS, atol=2 * EPS)  # an FMA may round the last add once


# --- the codec ------------------------------------------------------------------------------------------


def test_fast_codec_equals_the_library_codec(tiny_dac):
    """Encode (the encoder's continuous output, the codes, z) and decode, batch of 2, against the library's
    modules, within float32 rounding; the library's model is left untouched."""
    plain, fast = DACCodec(tiny_dac), DACCodec(tiny_dac, fast=True)
    assert fast.model is not tiny_dac and fast.model.quantizer is tiny_dac.quantizer
    assert type(tiny_dac.decoder).__name__ == "Decoder"  # not replaced in the caller's model
    assert fast.context_frames == plain.context_frames
    assert not any(p.requires_grad for p in fast.parameters())
    g = torch.Generator().manual_seed(0)
    audio = 0.1 * torch.randn(2, 1, 40 * 512 - 100, generator=g)
    z = torch.randn(2, 64, 40, generator=g)
    bound = rounding_bound(tiny_dac)
    with torch.no_grad():
        x = torch.nn.functional.pad(audio, (0, 100))
        assert rel(fast.model.encoder(x), tiny_dac.encoder(x)) < bound
    codes = plain.encode_codes(audio)
    assert torch.equal(fast.encode_codes(audio), codes)  # no code near a tie at this size of error
    assert torch.equal(fast.encode(audio), plain.encode(audio))  # z is rebuilt from the codes
    y, ref = fast.decode(z, 40 * 512 - 7), plain.decode(z, 40 * 512 - 7)
    assert y.shape == ref.shape == (2, 1, 40 * 512 - 7)
    assert rel(y, ref) < bound


def test_fast_codec_chunked_and_tiled_equals_the_library_in_one_pass(tiny_dac):
    """Long input through small chunks (with the codec's context) and tiles of one frame (each with its
    receptive field) gives the library's one-pass output; tiles without their halo would not."""
    from jat.data.synth import music_like

    audio = torch.from_numpy(music_like(1.2)).float()[None, None]  # [1, 1, L], 104 frames
    whole = DACCodec(tiny_dac, chunk_seconds=60.0)
    chunked = DACCodec(tiny_dac, chunk_seconds=0.2, fast=True)  # 17-frame chunks, 2 tiles each
    z = whole.encode(audio)
    y = whole.decode(z, audio.shape[-1])
    bound = rounding_bound(tiny_dac)
    assert torch.equal(chunked.encode_codes(audio), whole.encode_codes(audio))
    assert rel(chunked.decode(z, audio.shape[-1]), y) < bound
    one = fast_dac(tiny_dac, tile_frames=1)  # a tile per frame: every tile edge is inside the signal
    assert sum(isinstance(m, Tiled) for m in one.modules()) == 2  # the encoder's and the decoder's
    with torch.no_grad():
        x = torch.nn.functional.pad(audio, (0, -audio.shape[-1] % 512))
        assert rel(one.encoder(x), tiny_dac.encoder(x)) < bound
        assert rel(one.decode(z), tiny_dac.decode(z)) < bound
        # the halo comes from `span`: tiles cut to their own input samples get their edges wrong
        tiled = next(m for m in one.decoder.modules() if isinstance(m, Tiled))
        r = int(dac_fast.rate(tiled.stages))  # output samples per input sample of the tiled stages
        span = dac_fast.span
        try:
            dac_fast.span = lambda m, a, b: (a // r, -(-b // r)) if m is tiled.stages else span(m, a, b)
            assert rel(one.decode(z), tiny_dac.decode(z)) > 1e-3
        finally:
            dac_fast.span = span


def test_bf16_codec_is_within_bf16_rounding_and_actually_bf16(tiny_dac):
    """bf16 rounds to 8 bits of mantissa (unit roundoff 2^-9 = 2e-3 per rounding): the decode's relative error
    is a few of those compounded over the layers, far from fp32's rounding and far below order 1."""
    fast = DACCodec(tiny_dac, fast=True, dtype="bf16")
    assert {p.dtype for p in fast.model.decoder.parameters()} == {torch.bfloat16}
    z = torch.randn(2, 64, 30, generator=torch.Generator().manual_seed(0))
    y, ref = fast.decode(z), DACCodec(tiny_dac).decode(z)
    assert y.dtype == torch.float32
    assert 2**-12 < rel(y, ref) < 20 * 2**-9


def test_unknown_precision_is_refused(tiny_dac):
    from jat.codecs import CodecError

    with pytest.raises(CodecError, match="precision 'fp16'"):
        DACCodec(tiny_dac, fast=True, dtype="fp16")


# --- the benchmarks -------------------------------------------------------------------------------------


def test_flop_count_of_a_convolution_is_the_analytic_count():
    conv = nn.Conv1d(12, 20, 7, padding=9, dilation=3)
    x = torch.randn(2, 12, 100)
    assert count_flops(lambda: conv(x)) == 2 * 2 * 20 * 12 * 7 * 100  # 2 per multiply-add, per output
    up = nn.ConvTranspose1d(12, 20, 8, stride=4, padding=2)
    assert count_flops(lambda: up(x)) == 2 * 2 * 12 * 20 * 8 * 100  # every input meets every tap once


def test_dac_flops_are_linear_in_the_length(tiny_dac):
    per_frame = dac_flops_per_frame(tiny_dac, torch.device("cpu"))
    z = torch.zeros(1, 64, 5)
    assert count_flops(lambda: tiny_dac.decode(z)) == pytest.approx(5 * per_frame["decode"], rel=1e-12)
    assert per_frame["encode"] > 0 and per_frame["decode"] > 0


def test_rtf_rows_split_the_wall_time_into_stages(tmp_path):
    """The streaming path on the tiny config and the MDCT codec: every stage is clocked, they add up to the
    wall time, the RTF is total over the audio's length, the output is whole, and the clocks are removed."""
    import jat.infer.stream as stream
    from jat.evaluation.rtf import STAGES, build_upsampler, pipeline_rtf, write_input

    before = (stream.read_blocks, stream.read_samples, stream.low_frequency_replace)
    up = build_upsampler("tiny", "mdct")
    path = write_input(tmp_path / "in.wav", 1.5)
    row = pipeline_rtf(up, path, tmp_path / "out.wav", 2)
    assert (stream.read_blocks, stream.read_samples, stream.low_frequency_replace) == before
    assert "encode" not in up.latents.__dict__ and "decode" not in up.latents.__dict__
    assert row["evaluations"] == 2 and row["audio_seconds"] == pytest.approx(1.5)
    assert all(row[f"{k}_s"] > 0 for k in STAGES if k != "other") and row["other_s"] > -1e-3
    assert sum(row[f"{k}_s"] for k in STAGES) == pytest.approx(row["total_s"], rel=1e-9)
    assert row["rtf"] == pytest.approx(row["total_s"] / 1.5)
    assert row["network_rtf"] == pytest.approx(row["network_s"] / 1.5)
    assert sf.info(str(tmp_path / "out.wav")).frames == sf.info(str(path)).frames
