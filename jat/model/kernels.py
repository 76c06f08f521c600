"""The DiT's CPU and precision kernels, behind one process-wide switch (jat/model/dit.py calls them).

Each kernel computes a textbook function; the optimised forms only change how, never what:

    gelu            x·½(1 + tanh(u/2)) written as x·σ(u): ATen's CPU sigmoid is much faster than its tanh
    attention       grouped-query softmax(q·kᵀ/√hd)·v; on CPU the query heads sharing a K/V head are
                    folded into the sequence axis and it is two batched matmuls around a softmax
    norm_modulate   LayerNorm then x·(1 + scale) + shift, in the token stream's dtype (no autocast trips)
    ada_ln          the adaLN SiLU -> Linear on B rows, in the weights' own precision
    in_weight_precision   any few-row module in its weights' precision (the timestep MLP)
    cast_linears_   plain nn.Linear weights stored in the inference dtype once

The switch:

    kernels.use("plain")           # for the rest of the process
    with kernels.mode("plain"):    # for a block; the previous mode comes back, also on an exception
        ...
    kernels.current()              # "auto" unless changed

    "auto"   (default) the fast CPU forms on CPU tensors, fused ATen / SDPA kernels elsewhere, and the
             precision helpers everywhere: what training and inference run
    "plain"  the textbook forms everywhere: nn.GELU(approximate="tanh"), scaled_dot_product_attention
             with enable_gqa, LayerNorm then modulate and every Linear under autocast as it comes
    "fast"   the CPU forms on every device (to test or time them off CPU), precision helpers as in "auto"

The mode is read when a kernel runs, so a gradient-checkpointed block recomputes with the mode of its
backward: change the mode between steps, not between a forward and its backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("auto", "plain", "fast")
_mode = "auto"


def use(name: str) -> None:
    """Select the kernels for the whole process: "auto", "plain" or "fast" (module docstring)."""
    global _mode
    if name not in MODES:
        raise ValueError(f"unknown kernel mode '{name}' (choose from {', '.join(MODES)})")
    _mode = name


def current() -> str:
    """The selected mode."""
    return _mode


@contextmanager
def mode(name: str) -> Iterator[None]:
    """`use(name)` inside the block, the previous mode again after it (also when it raises)."""
    previous = _mode
    use(name)
    try:
        yield
    finally:
        use(previous)


def _cpu_form(x: torch.Tensor) -> bool:
    """Whether the CPU-optimised form runs for this tensor."""
    return _mode == "fast" or (_mode == "auto" and x.device.type == "cpu")


# --- GELU, tanh approximation -------------------------------------------------------------------


class _SigmoidGELU(torch.autograd.Function):
    """x·σ(u), u = K·(x + C·x³), with its hand-written derivative (one saved σ, no tanh)."""

    K = 2 * math.sqrt(2 / math.pi)
    C = 0.044715

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        k, c = _SigmoidGELU.K, _SigmoidGELU.C
        s = torch.addcmul(x.new_tensor(k), x, x, value=k * c).mul_(x).sigmoid_()  # σ(u)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        k, c = _SigmoidGELU.K, _SigmoidGELU.C
        du = torch.addcmul(x.new_tensor(k), x, x, value=3 * k * c).mul_(x)  # x·u'(x)
        ds = torch.addcmul(s, s, s, value=-1.0)  # σ'(u) = σ(1 - σ)
        return torch.addcmul(s, du, ds).mul_(grad)  # d/dx x·σ(u) = σ + x·u'·σ(1 - σ)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: x·½(1 + tanh(√(2/π)·(x + 0.044715·x³))) (docs/design.md section 3).

    Since ½(1 + tanh(z)) = σ(2z), this is x·σ(u) with u = 2·√(2/π)·(x + 0.044715·x³). On CPU, ATen's
    tanh kernel is several times slower than its sigmoid, so there the sigmoid form (with its own
    backward, `_SigmoidGELU`) runs about 1.5x faster forward and backward than F.gelu; elsewhere (and
    under "plain") F.gelu(approximate="tanh"), ATen's fused kernel.
    """
    if _cpu_form(x):
        return _SigmoidGELU.apply(x)
    return F.gelu(x, approximate="tanh")


class TanhGELU(nn.Module):
    """`gelu` as a layer: the same function as nn.GELU(approximate="tanh")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)


# --- grouped-query attention --------------------------------------------------------------------


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√hd)·v with query head h reading K/V head h // G, G = H/Hkv, without repeating K/V.

    q [B, H, N, hd], k/v [B, Hkv, N, hd], mask [B, 1, 1, N] (True = visible key) -> [B, H, N, hd].
    The G query heads that share a K/V head are consecutive, so a free reshape folds them into the
    sequence axis, [B, Hkv, G·N, hd], and attention is two batched matmuls around a softmax in the
    inputs' dtype. At our sequence lengths (130 tokens per 6 s) this runs 4.5x faster than the CPU
    flash kernel of scaled_dot_product_attention, forward and backward.
    """
    B, H, N, hd = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, (H // Hkv) * N, hd)  # [B, Hkv, G·N, hd]
    scores = (qg * hd**-0.5) @ k.transpose(-1, -2)  # [B, Hkv, G·N, N]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).reshape(B, H, N, hd)  # [B, H, N, hd]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same function through F.scaled_dot_product_attention (enable_gqa: K/V not repeated)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention, q [B, H, N, hd], k/v [B, Hkv, N, hd] -> [B, H, N, hd].

    `grouped_query_attention` on CPU, `sdpa_attention` elsewhere; autocast is off around it, since
    q, k and v come out of the projections in the token stream's dtype already (bf16 under autocast).
    Under "plain": scaled_dot_product_attention as it comes.
    """
    if _mode == "plain":
        return sdpa_attention(q, k, v, mask)
    with torch.autocast(q.device.type, enabled=False):
        k, v = k.to(q.dtype), v.to(q.dtype)
        if _cpu_form(q):
            return grouped_query_attention(q, k, v, mask)  # [B, H, N, hd]
        return sdpa_attention(q, k, v, mask)


# --- precision ----------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] · (1 + scale) + shift, with shift/scale [B, 1, D]: one fused pass."""
    return torch.addcmul(shift, x, 1 + scale)


def norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm then adaLN modulation, norm(x)·(1 + scale) + shift, in the token stream's own dtype.

    Under bf16 autocast the stream is already bf16. CUDA autocast would run LayerNorm in fp32 and
    make the next Linear cast its input back, two extra passes per norm (CPU autocast keeps the
    input dtype), so autocast is off here; the norm still accumulates its statistics in fp32 inside
    the kernel. Under "plain": norm then modulate, autocast as it comes.
    """
    if _mode == "plain":
        return modulate(norm(x), shift, scale)
    with torch.autocast(x.device.type, enabled=False):
        return modulate(norm(x), shift.to(x.dtype), scale.to(x.dtype))  # [B, N, D]


def in_weight_precision(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """module(x) with x cast to `weight`'s dtype and autocast off: for products of a few rows.

    A product of B rows with a weight matrix is bound by reading the weights, so an autocast copy of
    them (made again for the gradient) costs more than the product itself. Under "plain" autocast
    stays on (and makes that copy).
    """
    if _mode == "plain":
        return module(x.to(weight.dtype))
    with torch.autocast(x.device.type, enabled=False):
        return module(x.to(weight.dtype))


def ada_ln(modulation: nn.Sequential, cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """adaLN vectors SiLU -> Linear: cond [B, D] -> [B, 1, k·D] in the token stream's `dtype`.

    The Linear holds a third of V2's parameters and sees B rows: it runs in the weights' own precision
    (`in_weight_precision`). Adapted or quantized layers (nn.Linear subclasses) keep autocast.
    """
    linear = modulation[-1]
    if type(linear) is nn.Linear:
        out = in_weight_precision(modulation, cond, linear.weight)
    else:
        out = modulation(cond)
    return out.to(dtype).unsqueeze(1)


def cast_linears_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the weights of plain nn.Linear layers in `dtype`, in place (inference under autocast).

    Autocast would otherwise cast every fp32 weight again at every sampler step. Quantized or wrapped
    layers (subclasses) and buffers such as the RoPE frequencies keep their dtype.
    """
    for m in model.modules():
        if type(m) is nn.Linear:
            m.to(dtype)
    return model
