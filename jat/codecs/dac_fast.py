"""A faster DAC encoder and decoder: the same function as descript-audio-codec's, rearranged for the CPU.

`fast_dac(model)` returns a `dac.DAC` whose `encoder` and `decoder` are replaced by modules built here from
the originals (the model passed in is left as it was; the quantizer is shared). They take and give the same
tensors, [B, C, L], so `DACCodec` chunks, pads and crops exactly as before. What changes (speeds: one core
of the development machine, fp32):

- Weight norm is folded once. The library recomputes w = g v / ||v|| before every call; here each
  convolution keeps the folded w, computed by the library's own weight-norm hook, so the weights are the
  ones the library would use, bit for bit.
- Channels-last layout. Activations live as [B, C, 1, L] in channels-last memory (time-major, channels
  contiguous), the layout oneDNN's direct convolutions work in, so no layer reorders its input. The
  96-channel kernel-7 layers at 44.1 kHz ran at 44 GFLOP/s as [B, C, L], 66-73 so.
- Resampling convolutions in polyphase form. ConvTranspose1d(stride s, kernel K) is a stride-1
  convolution from C_in to s·C_out channels over ceil(K / s) input taps, then the s phases interleaved:
  with the phase as the outer channel index that is a free reshape in channels-last memory (the decoder's
  stride-4 and stride-2 layers: 55 and 34 GFLOP/s as transposed convolutions, 100 and 78 so). A strided
  Conv1d likewise reads the input as blocks of s samples x C channels (`Conv`).
- The high-rate stages run a tile at a time (`Tiled`): each tile's input widened by its receptive field,
  so the result is the one-pass result while the activations stay in cache and below the size at which
  malloc hands memory back to the kernel (untiled, a 5 s decode faulted 750 k pages in).
- A lean Snake: x + sin²(αx) / (α + 1e-9) in four passes over one new tensor (the library's TorchScript
  function makes three new tensors in six passes); its sin is most of its time. torch.compile fused it
  into one loop but ran slower (14 ms against 9 ms for 96 x 44544 values), so it stays eager.

Outputs equal the library's up to float rounding (about 2e-6 relative on the 44 kHz model): the
convolutions sum the same products in another order. `dtype=torch.bfloat16` runs everything in bf16
(8 bits of mantissa): about 2x faster where the CPU has AVX512-BF16, but about 1e-2 relative from fp32,
and any single layer in bf16 already costs more than 1e-3 (docs/benchmarks.md "DAC codec"), so fp32 is
the default.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

from .base import CodecError

if TYPE_CHECKING:
    import dac

CL = torch.channels_last
TILE_FRAMES = 32  # latent frames per tile of the high-rate stages (0.37 s)


@torch.no_grad()
def folded_weight(conv: nn.Module) -> torch.Tensor:
    """The effective weight of a (possibly weight-normed) convolution, computed once: g v / ||v|| by the
    hook of `torch.nn.utils.weight_norm` itself (what it computes before every call), else the
    parametrized or plain weight."""
    for hook in conv._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return hook.compute_weight(conv).detach()
    return conv.weight.detach()


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Conv(nn.Module):
    """A Conv1d (folded weight) as a conv2d over [B, C, 1, L] in channels-last memory.

    A strided one (stride s, kernel K, padding p) runs in polyphase form: the input padded by p is viewed
    as L / s blocks of s·C channels (a free reshape in channels-last memory) and convolved with stride 1
    over ceil(K / s) blocks; oneDNN runs DAC's stride-4 and stride-8 layers about 1.3x faster so.
    """

    def __init__(self, conv: nn.Conv1d, dtype: torch.dtype):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise CodecError(f"fast DAC: unsupported convolution {conv}")
        w = folded_weight(conv)  # [C_out, C_in, K]
        c_out, c_in, self.k = w.shape
        self.s, self.p, self.d = conv.stride[0], conv.padding[0], conv.dilation[0]
        self.blocked = self.s >= 4 and self.d == 1  # at stride 2 the direct kernel is as fast (measured)
        if self.blocked:  # weight [C_out, (r, c), t] for kernel index t s + r
            self.taps = math.ceil(self.k / self.s)
            w = F.pad(w, (0, self.taps * self.s - self.k)).view(c_out, c_in, self.taps, self.s)
            w = w.permute(0, 3, 1, 2).reshape(c_out, self.s * c_in, self.taps)
        self.weight = _frozen(w[:, :, None].to(dtype).contiguous(memory_format=CL))  # [C_out, C_in', 1, k']
        self.bias = None if conv.bias is None else _frozen(conv.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, 1, L] -> [B, C_out, 1, L']
        if not self.blocked:
            return F.conv2d(x, self.weight, self.bias, (1, self.s), (0, self.p), (1, self.d))
        B, C, _, L = x.shape
        n = (L + 2 * self.p - self.k) // self.s + 1  # output samples
        size = (n + self.taps - 1) * self.s  # padded input: whole blocks
        x = F.pad(x, (self.p, size - L - self.p)).contiguous(memory_format=CL)  # [B, C, 1, size]
        x = x.permute(0, 2, 3, 1).reshape(B, 1, size // self.s, self.s * C).permute(0, 3, 1, 2)  # blocks
        return F.conv2d(x, self.weight, self.bias)  # [B, C_out, 1, n]


class Upsample(nn.Module):
    """A ConvTranspose1d(stride s, kernel K, padding p) as a polyphase stride-1 convolution.

    Output sample n (m = n + p = q s + r) is sum_t x[q - t] w[:, :, r + t s] over the taps t < ceil(K / s):
    phase r of output block q is an ordinary convolution over input positions q - taps + 1 .. q. The
    convolution's output channel r·C_out + o holds phase r of channel o, so in channels-last memory
    [B, Q, s, C_out] is already the interleaved [B, Q·s, C_out].
    """

    def __init__(self, conv: nn.ConvTranspose1d, dtype: torch.dtype):
        super().__init__()
        if conv.groups != 1 or conv.dilation[0] != 1 or conv.output_padding[0] != 0:
            raise CodecError(f"fast DAC: unsupported transposed convolution {conv}")
        w = folded_weight(conv)  # [C_in, C_out, K]
        c_in, self.c_out, K = w.shape
        s, p = conv.stride[0], conv.padding[0]
        self.s, self.p, self.K, self.taps = s, p, K, math.ceil(K / s)
        w = F.pad(w, (0, self.taps * s - K)).view(c_in, self.c_out, self.taps, s)  # kernel index t s + r
        # weight [(r, o), C_in, d]: tap d reads input q - (taps - 1) + d, i.e. t = taps - 1 - d
        w = w.flip(2).permute(3, 1, 0, 2).reshape(s * self.c_out, c_in, self.taps)
        w = w[:, :, None].to(dtype).contiguous(memory_format=CL)  # [s C_out, C_in, 1, taps]
        self.weight = _frozen(w)
        bias = None if conv.bias is None else conv.bias.detach().repeat(s)  # channel (r, o) takes bias[o]
        self.bias = None if bias is None else _frozen(bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, 1, T] -> [B, C_out, 1, L]
        B, T = x.shape[0], x.shape[-1]
        s, p = self.s, self.p
        L = (T - 1) * s - 2 * p + self.K
        q0, q1 = p // s, (L - 1 + p) // s  # the output blocks q that hold samples 0 .. L-1
        left, right = self.taps - 1 - q0, q1 - (T - 1)  # input padding (negative: crop)
        if left == right >= 0:
            z = F.conv2d(x, self.weight, self.bias, padding=(0, left))  # [B, s C_out, 1, Q]
        else:
            z = F.conv2d(F.pad(x, (left, right)), self.weight, self.bias)  # [B, s C_out, 1, Q]
        Q = z.shape[-1]
        y = z.permute(0, 2, 3, 1).reshape(B, 1, Q * s, self.c_out)  # [B, 1, Q s, C_out], m - q0 s
        y = y[:, :, p - q0 * s : p - q0 * s + L].permute(0, 3, 1, 2)  # [B, C_out, 1, L]
        return y.contiguous(memory_format=CL)  # a view for B = 1


class Snake(nn.Module):
    """Snake x + sin²(αx) / (α + 1e-9): the library's operations, in place on one new tensor (four passes
    over memory instead of six and three new tensors)."""

    def __init__(self, snake: nn.Module, dtype: torch.dtype):
        super().__init__()
        alpha = snake.alpha.detach()  # [1, C, 1]
        self.alpha = _frozen(alpha[..., None].to(dtype))  # [1, C, 1, 1]
        self.inv = _frozen((alpha + 1e-9).reciprocal()[..., None].to(dtype))  # [1, C, 1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, 1, L]
        s = torch.mul(x, self.alpha).sin_().square_()  # [B, C, 1, L] sin²(αx)
        return torch.addcmul(x, s, self.inv, out=s)  # x + sin²(αx) / (α + 1e-9), into s


class Residual(nn.Module):
    """DAC's ResidualUnit: x + block(x), the block's output added to in place."""

    def __init__(self, block: nn.Sequential):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, 1, L]
        y = self.block(x)  # [B, C, 1, L']
        pad = (x.shape[-1] - y.shape[-1]) // 2  # as the library does (0 with its "same" padding)
        return y.add_(x[..., pad : x.shape[-1] - pad] if pad > 0 else x)


def convert(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The fast form of one module of a DAC encoder or decoder (recursively). DAC's own classes are known
    by name: `dac.DAC.load` may rebuild them from a saved package as classes of another identity. A
    CodecError for a module this file does not know, so an unfamiliar architecture fails loudly instead of
    computing something else."""
    kind = type(m).__name__
    if kind == "ResidualUnit":
        return Residual(convert(m.block, dtype))
    if kind in ("EncoderBlock", "DecoderBlock"):  # their forward is block(x)
        return convert(m.block, dtype)
    if kind == "Snake1d":
        return Snake(m, dtype)
    if isinstance(m, nn.Sequential):
        return nn.Sequential(*(convert(c, dtype) for c in m))
    if isinstance(m, nn.Conv1d):
        return Conv(m, dtype)
    if isinstance(m, nn.ConvTranspose1d):
        return Upsample(m, dtype)
    if isinstance(m, nn.Tanh):
        return nn.Tanh()
    raise CodecError(f"fast DAC: no fast form for {kind}; set codec.dac_fast=false")


# --- tiled execution: the high-rate stages a tile at a time, so their activations stay in cache ----------


def span(m: nn.Module, a: int, b: int) -> tuple[int, int]:
    """The input samples [a', b') that output samples [a, b) of module `m` read (before clipping)."""
    if isinstance(m, Conv):
        return a * m.s - m.p, (b - 1) * m.s - m.p + m.d * (m.k - 1) + 1
    if isinstance(m, Upsample):
        return (a + m.p) // m.s - m.taps + 1, (b - 1 + m.p) // m.s + 1
    if isinstance(m, Residual):
        lo, hi = span(m.block, a, b)
        return min(lo, a), max(hi, b)
    if isinstance(m, nn.Sequential):
        for layer in reversed(m):
            a, b = span(layer, a, b)
        return a, b
    return a, b  # elementwise: Snake, Tanh


def length(m: nn.Module, n: int) -> int:
    """Output samples of module `m` for n input samples."""
    if isinstance(m, Conv):
        return (n + 2 * m.p - m.d * (m.k - 1) - 1) // m.s + 1
    if isinstance(m, Upsample):
        return (n - 1) * m.s - 2 * m.p + m.K
    if isinstance(m, (Residual, nn.Sequential)):
        for layer in (m.block,) if isinstance(m, Residual) else m:
            n = length(layer, n)
    return n


def offset(m: nn.Module, a: int) -> int:
    """The output sample that local output 0 is when `m` runs on input starting at sample a (a multiple of
    `stride(m)`): convolutions pad each slice as they pad the whole, so a slice's outputs are the whole's,
    shifted, except within the receptive field of its ends."""
    if isinstance(m, Conv):
        return a // m.s
    if isinstance(m, Upsample):
        return a * m.s
    if isinstance(m, (Residual, nn.Sequential)):
        for layer in (m.block,) if isinstance(m, Residual) else m:
            a = offset(layer, a)
    return a


def stride(m: nn.Module) -> int:
    """Input samples per output sample over all strided convolutions in `m` (slices start on this grid)."""
    if isinstance(m, Conv):
        return m.s
    if isinstance(m, (Residual, nn.Sequential)):
        return math.prod(stride(layer) for layer in ((m.block,) if isinstance(m, Residual) else m))
    return 1


class Tiled(nn.Module):
    """Stages run on `tile` output samples at a time, each tile's input widened by what its outputs read
    (`span`) and clipped at the signal's ends, where the zero padding is the whole signal's own: every kept
    output sees the input it sees in one pass, so the result equals one pass up to float rounding, while
    the activations of a tile (a few MB) stay in the CPU's cache and in memory that malloc reuses."""

    def __init__(self, stages: nn.Sequential, tile: int):
        super().__init__()
        self.stages, self.tile, self.grid = stages, tile, stride(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, 1, n] -> [B, C', 1, n']
        n, g = x.shape[-1], self.grid
        total = length(self.stages, n)
        if total <= self.tile:
            return self.stages(x)
        out = None
        for a in range(0, total, self.tile):
            b = min(a + self.tile, total)
            lo, hi = span(self.stages, a, b)
            lo, hi = max(lo // g * g, 0), min(-(-hi // g) * g, n)
            y = self.stages(x[..., lo:hi].contiguous(memory_format=CL))  # [B, C', 1, m]
            k = a - offset(self.stages, lo)
            if k < 0 or k + b - a > y.shape[-1]:
                raise CodecError(f"fast DAC: tile [{a}, {b}) not covered by its input [{lo}, {hi})")
            if out is None:
                out = y.new_empty(*y.shape[:-1], total).contiguous(memory_format=CL)  # [B, C', 1, n']
            out[..., a:b] = y[..., k : k + b - a]
        return out


class FastStack(nn.Module):
    """A DAC encoder or decoder in fast form, with the original's interface: [B, C, L] in and out (fp32)."""

    def __init__(self, layers: nn.Sequential, dtype: torch.dtype):
        super().__init__()
        self.layers, self.dtype = layers, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L] -> [B, C', L']
        h = x.to(self.dtype)[:, :, None].contiguous(memory_format=CL)  # [B, C, 1, L]
        h = self.layers(h)  # [B, C', 1, L']
        return h[:, :, 0].to(x.dtype).contiguous()  # [B, C', L']


def rate(m: nn.Module) -> Fraction:
    """Output samples per input sample of module `m`."""
    if isinstance(m, Conv):
        return Fraction(1, m.s)
    if isinstance(m, Upsample):
        return Fraction(m.s)
    if isinstance(m, (Residual, nn.Sequential)):
        layers = (m.block,) if isinstance(m, Residual) else m
        return math.prod((rate(layer) for layer in layers), start=Fraction(1))
    return Fraction(1)


def tile_high_rate(stages: nn.Sequential, per_frame: int, tile_frames: int, least: int = 64) -> nn.Sequential:
    """The stages whose output has at least `least` samples per latent frame (a prefix of the encoder, a
    suffix of the decoder; the input has `per_frame`) grouped into one `Tiled` of `tile_frames` frames."""
    out, r = [], Fraction(per_frame)
    for st in stages:
        r *= rate(st)
        out.append(r)
    high = [i for i, r in enumerate(out) if r >= least]
    if not high or len(high) == len(out) or high != list(range(high[0], high[-1] + 1)):
        return stages
    i, j = high[0], high[-1] + 1
    tiled = Tiled(nn.Sequential(*stages[i:j]), max(1, int(tile_frames * out[j - 1])))
    return nn.Sequential(*stages[:i], tiled, *stages[j:])


def fast_dac(model: dac.DAC, dtype: torch.dtype = torch.float32,
             tile_frames: int | None = TILE_FRAMES) -> dac.DAC:
    """A copy of `model` whose encoder and decoder are the fast forms (`FastStack`), their high-rate stages
    tiled by `tile_frames` latent frames (None: not tiled); the quantizer and every attribute are shared with
    `model`, which is not changed."""
    enc, dec = convert(model.encoder.block, dtype), convert(model.decoder.model, dtype)
    if tile_frames:
        enc = tile_high_rate(enc, int(model.hop_length), tile_frames)
        dec = tile_high_rate(dec, 1, tile_frames)
    enc, dec = FastStack(enc, dtype).eval(), FastStack(dec, dtype).eval()
    out = copy.copy(model)
    out._modules = dict(model._modules)  # a module table of its own: replacing entries leaves `model` alone
    out.encoder, out.decoder = enc, dec
    return out
