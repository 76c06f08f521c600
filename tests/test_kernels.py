"""jat/model/kernels.py: each fast form computes the plain form's function, and one switch picks them.

Tolerances are first-order rounding bounds, written in units of eps = torch.finfo(dtype).eps (twice the
unit roundoff, so every "rounding" below is counted generously). They hold whatever the summation
order, so on any CPU, vector width and thread count.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import trained_jat
from torch import nn

from jat.model import kernels
from jat.model.dit import JaT, RotaryEmbedding, model_config
from jat.model.kernels import TanhGELU, cast_linears_, grouped_query_attention, sdpa_attention

DTYPES = [torch.float64, torch.float32]


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """|actual - expected| <= bound elementwise (all compared in float64)."""
    err = (actual.detach().double() - expected.detach().double()).abs()
    bound = bound.detach().double()
    worst = float((err / bound.clamp_min(1e-300)).max())
    assert bool((err <= bound).all()), f"error up to {worst:.3g}x the bound"


# --- GELU ----------------------------------------------------------------------------------------

# Both forms compute g(x) = x·s(x), s = σ(u) = ½(1 + tanh(u/2)), u = K·(x + C·x³), g' = s + x·u'·s(1 - s).
# Forward, per form: u carries <= 3 roundings, which move s by <= 3eps·max_z |z|σ'(z) < eps; the fast
# form's exp, 1 + e and reciprocal give s to <= 3eps (s <= 1, so absolutely); the plain form's tanh
# (1 ulp), 1 + tanh and ½ give s to <= 2eps absolutely (1 + tanh cancels for x << 0, so the error is
# absolute, not relative to g); the product with x adds eps·|x|. Two forms: <= 10·eps·|x|.
# Backward, per form: s to <= 4eps, s(1 - s) (s - s², or 1 - tanh²) to <= 6eps absolutely, x·u' to
# 3eps relatively, the sum and the product with the incoming gradient two more: <= (5 + 7·|x·u'|)·eps
# per unit gradient. Two forms: <= 10·eps·(1 + |x·u'|)·|grad|.
GELU_ULPS = 10


def _gelu_inputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-12, 12, 24001, dtype=torch.float64)  # both tails and the bend
    tiny = torch.tensor([0.0, 1e-30, -1e-30, 1e-6, -1e-6], dtype=torch.float64)
    return torch.cat([grid, tiny, 3 * torch.randn(4000, generator=g, dtype=torch.float64)]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_gelu_is_tanh_gelu_forward_and_backward(dtype):
    x = _gelu_inputs(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with kernels.mode("fast"):
        y = TanhGELU()(x)
    y_ref = F.gelu(x_ref, approximate="tanh")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y.backward(grad)
    y_ref.backward(grad)

    e, X = eps(dtype), x.detach().double().abs()
    within(y, y_ref, GELU_ULPS * e * X)
    K, C = 2 * math.sqrt(2 / math.pi), 0.044715
    x_du = X * K * (1 + 3 * C * X**2)  # |x·u'(x)|
    within(x.grad, x_ref.grad, GELU_ULPS * e * (1 + x_du) * grad.double().abs())


def test_sigmoid_gelu_in_bf16_is_within_its_roundings():
    # bf16 in: the fast form rounds u twice, σ and x·σ once each (<= 3.5eps·|x|, eps of bf16); ATen's
    # gelu computes in fp32 and rounds once. The plain result of the same bf16 x is the reference.
    xb = _gelu_inputs(torch.float32).bfloat16()
    with kernels.mode("fast"):
        y = TanhGELU()(xb)
    assert y.dtype == torch.bfloat16
    within(y, F.gelu(xb.double(), approximate="tanh"), GELU_ULPS * eps(torch.bfloat16) * xb.double().abs())


def test_sigmoid_gelu_gradient_against_finite_differences():
    with kernels.mode("fast"):
        x = torch.randn(64, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(TanhGELU(), x)


# --- grouped-query attention --------------------------------------------------------------------

# One form, first order, for q [B, H, N, hd], k/v [B, Hkv, N, hd], G = H/Hkv:
#   scores s_ij = q_i·k_j/√hd, a length-hd dot product in any order: |δs_ij| <= (hd + 1)·eps·a_ij,
#     a = |q|·|k|ᵀ/√hd; call δ_i its largest value over the visible keys j;
#   weights p = softmax(s): the score errors move p_ij by <= 2δ_i·p_ij, and the max, exp, the
#     length-N normaliser and the division add <= (N + 4)·eps·p_ij: ρ_i = 2δ_i + (N + 4)·eps;
#   output o_i = Σ_j p_ij·v_j: |δo_i| <= (ρ_i + N·eps)·Σ_j p_ij·|v_j|.
# Backward with incoming dO: dp = dO·vᵀ (hd terms), ds = p∘(dp - Σ_l p·dp) (N terms), dq = ds·k/√hd
# (N terms), dk = dsᵀ·q/√hd and dv = pᵀ·dO (G·N terms each: the G heads of a group add up). Each
# term holds p at most twice, so the error is <= (2ρ + (hd + (G + 1)·N + 4)·eps)·M with M the same
# formulas on absolute values (|dp| -> |dO|·|v|ᵀ, the difference in ds -> a sum).
# Two forms differ by at most twice one form's bound.


def _repeat(x: torch.Tensor, G: int) -> torch.Tensor:
    return x.repeat_interleave(G, dim=1)  # [B, Hkv, ...] -> [B, H, ...]: head h reads K/V head h // G


def textbook_attention(q, k, v, mask=None):
    """softmax(q·kᵀ/√hd)·v with K/V repeated to the query heads."""
    G = q.shape[1] // k.shape[1]
    s = q @ _repeat(k, G).transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, N, N]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ _repeat(v, G)  # [B, H, N, hd]


def attention_bounds(q, k, v, mask, d_out, dtype):
    """Bounds on |form A - form B| for (o, dq, dk, dv), from the comment above (computed in float64)."""
    q, k, v, d_out = (t.detach().double() for t in (q, k, v, d_out))
    B, H, N, hd = q.shape
    G, e = H // k.shape[1], eps(dtype)
    kr, vr = _repeat(k, G), _repeat(v, G)  # [B, H, N, hd]
    visible = torch.ones(B, 1, 1, N, dtype=torch.bool) if mask is None else mask
    a = (q.abs() @ kr.abs().transpose(-1, -2) / math.sqrt(hd)).masked_fill(~visible, 0)  # [B, H, N, N]
    rho = 2 * (hd + 1) * e * a.amax(-1, keepdim=True) + (N + 4) * e  # [B, H, N, 1]
    p = torch.softmax((q @ kr.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~visible, -math.inf), -1)
    bound_o = (rho + N * e) * (p @ vr.abs())  # [B, H, N, hd]

    dp = d_out.abs() @ vr.abs().transpose(-1, -2)  # |dp| [B, H, N, N]
    ds = p * (dp + (p * dp).sum(-1, keepdim=True))  # |ds|
    factor = 2 * rho.amax() + (hd + (G + 1) * N + 4) * e

    def grouped(t):  # [B, H, N, hd] -> [B, Hkv, N, hd], the sum over each group's G heads
        return t.unflatten(1, (-1, G)).sum(2)

    bound_dq = factor * (ds @ kr.abs()) / math.sqrt(hd)
    bound_dk = factor * grouped(ds.transpose(-1, -2) @ q.abs()) / math.sqrt(hd)
    bound_dv = factor * grouped(p.transpose(-1, -2) @ d_out.abs())
    return [2 * b for b in (bound_o, bound_dq, bound_dk, bound_dv)]


SHAPES = [  # B, H, Hkv, N, hd: groups of 1, 2 and 4; 130 tokens = 6 s
    (2, 4, 4, 9, 8),
    (2, 4, 2, 17, 16),
    (1, 8, 2, 130, 64),
]


def _qkv(shape, dtype, masked, seed=0):
    B, H, Hkv, N, hd = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, hd, generator=g, dtype=dtype) for h in (H, Hkv, Hkv))
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, N, generator=g) < 0.6
        mask[..., 0] = True  # every query sees at least one key
    d_out = torch.randn(B, H, N, hd, generator=g, dtype=dtype)
    return q, k, v, mask, d_out


def _run(fn, q, k, v, mask, d_out):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, mask)
    o.backward(d_out)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"G{s[1] // s[2]}-N{s[3]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", [grouped_query_attention, sdpa_attention], ids=["grouped", "sdpa"])
def test_attention_forms_are_textbook_attention(form, dtype, shape, masked):
    q, k, v, mask, d_out = _qkv(shape, dtype, masked)
    got = _run(form, q, k, v, mask, d_out)
    expected = _run(textbook_attention, q, k, v, mask, d_out)
    for name, a, b, bound in zip(("o", "dq", "dk", "dv"), got, expected,
                                 attention_bounds(q, k, v, mask, d_out, dtype), strict=True):
        assert a.shape == b.shape, name
        within(a, b, bound)
    if mask is not None:  # a hidden key gets no gradient at all
        hidden = ~mask[:, 0, 0]  # [B, N]
        for grad in got[2:]:  # dk, dv [B, Hkv, N, hd]
            assert bool((grad.transpose(1, 2)[hidden] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_grouped_and_sdpa_forms_agree(dtype, masked):
    q, k, v, mask, d_out = _qkv(SHAPES[2], dtype, masked, seed=1)
    a = _run(grouped_query_attention, q, k, v, mask, d_out)
    b = _run(sdpa_attention, q, k, v, mask, d_out)
    for x, y, bound in zip(a, b, attention_bounds(q, k, v, mask, d_out, dtype), strict=True):
        within(x, y, bound)


@pytest.mark.parametrize("name", kernels.MODES)
def test_attention_layer_is_textbook_attention_in_every_mode(name):
    """The DiT's Attention (projections, RoPE, key mask, kernel, output projection) against the
    textbook with repeated K/V on the same projections. Only the kernel differs: its bound δo, then
    the output projection W: |W|·δo, plus <= D·eps·|W|·|o| for each side's rounding of the product."""
    torch.manual_seed(0)
    cfg = model_config("small", in_channels=8)  # 6 query heads on 2 K/V heads
    model = JaT(cfg)
    attn = model.blocks[0].attn
    x = torch.randn(2, 11, cfg.hidden_size)
    cos, sin = model.rope(torch.arange(11))
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[1, 7:] = False
    with kernels.mode(name), torch.no_grad():
        out = attn(x, (cos, sin), key_mask)  # [B, N, D]

        hd = attn.head_dim
        q = attn.q(x).view(2, 11, -1, hd).transpose(1, 2)  # [B, H, N, hd]
        k = attn.k(x).view(2, 11, -1, hd).transpose(1, 2)  # [B, Hkv, N, hd]
        v = attn.v(x).view(2, 11, -1, hd).transpose(1, 2)  # [B, Hkv, N, hd]
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        mask = key_mask[:, None, None, :]
        o = textbook_attention(q, k, v, mask).transpose(1, 2).reshape(2, 11, -1)  # [B, N, H·hd]
        expected = attn.out(o)
        bound_o = attention_bounds(q, k, v, mask, torch.zeros_like(q), torch.float32)[0]
        W, e = attn.out.weight.double().abs(), eps(torch.float32)
        bound_o = bound_o.transpose(1, 2).reshape(2, 11, -1)  # [B, N, H·hd]
        bound = bound_o @ W.T + 2 * W.shape[1] * e * (o.double().abs() @ W.T)
    within(out, expected, bound)


@pytest.mark.parametrize("name", ["fast", "plain"])
def test_attention_keeps_no_repeated_kv_for_backward(name):
    """What the backward holds: q, the output, the N×N weights and ONE K and V per K/V head; a repeat
    to the H query heads would add 2·(G - 1)·|k|, more than the slack here (hd >> N, G = 4)."""
    B, H, Hkv, N, hd = 2, 8, 2, 4, 256
    q, k, v, mask, _ = _qkv((B, H, Hkv, N, hd), torch.float32, masked=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with kernels.mode(name), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.attention(q, k, v, mask)
    saved = sum(storages.values())
    no_repeat = 2 * q.numel() + k.numel() + v.numel() + B * H * N * N + B * H * N + mask.numel()
    assert saved <= no_repeat < saved + 2 * (H // Hkv - 1) * k.numel()


# --- precision helpers --------------------------------------------------------------------------


def _stream(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(2, 7, 48, generator=g) + 1
    shift, scale = torch.randn(2, 1, 48, generator=g), torch.randn(2, 1, 48, generator=g)
    return x, shift, scale


def test_norm_modulate_without_autocast_is_layernorm_then_modulate():
    norm = nn.LayerNorm(48, elementwise_affine=False, eps=1e-6)
    x, shift, scale = _stream()
    plain = norm(x) * (1 + scale) + shift
    for name in kernels.MODES:
        with kernels.mode(name):
            # one fused multiply-add instead of a multiply and an add: <= 2 roundings apart
            out = kernels.norm_modulate(norm, x, shift, scale)
        within(out, plain, 2 * eps(torch.float32) * (norm(x).abs() * (1 + scale).abs() + shift.abs()))


@pytest.mark.parametrize("name", ["auto", "plain"])
def test_norm_modulate_under_bf16_autocast(name):
    """'auto' keeps the bf16 stream bf16; both modes compute LayerNorm then modulate. bf16 rounds the
    norm's output, shift, scale, 1 + scale and the product-sum once each: <= 3eps·(|n|(|1 + s| + |s|)
    + |shift|), eps of bf16, against the float64 maths on the same bf16 x (float32 roundings are 2^-16
    times smaller)."""
    norm = nn.LayerNorm(48, elementwise_affine=False, eps=1e-6)
    x, shift, scale = _stream()
    xb = x.bfloat16()
    with kernels.mode(name), torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.norm_modulate(norm, xb, shift, scale)
    if name == "auto":
        assert out.dtype == torch.bfloat16
    n = F.layer_norm(xb.double(), (48,), eps=1e-6)
    s, b = scale.double(), shift.double()
    within(out, n * (1 + s) + b, 3 * eps(torch.bfloat16) * (n.abs() * ((1 + s).abs() + s.abs()) + b.abs()))


def test_ada_ln_runs_in_the_weights_precision_under_autocast():
    torch.manual_seed(0)
    modulation = nn.Sequential(nn.SiLU(), nn.Linear(32, 6 * 32))
    cond = torch.randn(3, 32)
    fp32 = modulation(cond)  # [B, 6D] in the weights' fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.ada_ln(modulation, cond, torch.bfloat16)
        autocast_product = modulation(cond)
    # auto: the fp32 product rounded once to the stream's bf16, exactly
    assert out.shape == (3, 1, 6 * 32) and torch.equal(out, fp32.bfloat16().unsqueeze(1))
    with kernels.mode("plain"), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = kernels.ada_ln(modulation, cond, torch.bfloat16)
    assert torch.equal(plain, autocast_product.unsqueeze(1))  # plain: autocast as it comes


def test_ada_ln_leaves_wrapped_linears_to_autocast():
    class Wrapped(nn.Linear):  # stands for an adapted or quantized layer
        pass

    torch.manual_seed(0)
    modulation = nn.Sequential(nn.SiLU(), Wrapped(32, 64))
    cond = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.ada_ln(modulation, cond, torch.bfloat16)
        expected = modulation(cond)
    assert torch.equal(out, expected.unsqueeze(1))


def test_cast_linears_casts_plain_linears_only():
    class Wrapped(nn.Linear):
        pass

    model = JaT(model_config("tiny", in_channels=8, envelope_bands=4))
    fc2 = model.blocks[0].mlp.fc2
    model.blocks[0].mlp.fc2 = Wrapped(fc2.in_features, fc2.out_features)
    cast_linears_(model, torch.bfloat16)
    assert model.blocks[0].attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.q.bias.dtype == torch.bfloat16
    assert model.blocks[0].mlp.fc2.weight.dtype == torch.float32  # a subclass keeps its dtype
    assert model.rope.inv_freq.dtype == torch.float32  # buffers too
    assert model.envelope.net[0].weight.dtype == torch.float32  # and other layers


# --- the switch ---------------------------------------------------------------------------------


def test_switch_defaults_to_auto_and_restores_after_the_block():
    assert kernels.current() == "auto"
    with kernels.mode("plain"):
        assert kernels.current() == "plain"
        with kernels.mode("fast"):
            assert kernels.current() == "fast"
        assert kernels.current() == "plain"
    assert kernels.current() == "auto"
    with pytest.raises(RuntimeError, match="boom"), kernels.mode("plain"):
        raise RuntimeError("boom")
    assert kernels.current() == "auto"
    with pytest.raises(ValueError, match="unknown kernel mode"):
        kernels.use("sdpa")
    with pytest.raises(ValueError), kernels.mode("fastest"):
        pass
    assert kernels.current() == "auto"
    kernels.use("plain")
    try:
        assert kernels.current() == "plain"
    finally:
        kernels.use("auto")


def test_each_mode_runs_its_forms_on_cpu():
    q, k, v, mask, _ = _qkv(SHAPES[1], torch.float32, masked=True)
    x = _gelu_inputs(torch.float32)
    grouped, sdpa = grouped_query_attention(q, k, v, mask), sdpa_attention(q, k, v, mask)
    with kernels.mode("fast"):
        sigmoid_form = kernels.gelu(x)
    tanh_form = F.gelu(x, approximate="tanh")
    assert not torch.equal(grouped, sdpa) and not torch.equal(sigmoid_form, tanh_form)  # they do differ
    for name, attn, act in (("auto", grouped, sigmoid_form), ("fast", grouped, sigmoid_form),
                            ("plain", sdpa, tanh_form)):
        with kernels.mode(name):
            assert torch.equal(kernels.attention(q, k, v, mask), attn), name
            assert torch.equal(kernels.gelu(x), act), name


def _model(seed=0):
    """The tiny DiT, trained-looking (at init every block is the identity), in float64."""
    return trained_jat(model_config("tiny", in_channels=8), seed, std=0.1).double()


def _forward_backward(model, name):
    g = torch.Generator().manual_seed(2)
    x, c = (torch.randn(2, 8, 61, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(2, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 61, dtype=torch.bool)
    mask[1, 33:] = False  # padded frames: the key mask is in play
    model.zero_grad(set_to_none=True)
    with kernels.mode(name):
        out = model(x, t, c, mask)
        out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_plain_kernels_give_the_same_model_in_float64():
    """Each kernel's two forms differ by at most κ·eps of its activations (bounds above: κ = 10 for
    GELU, 2·(2(hd + 1)·max a + 2N + 8) < 600 for this model's attention, hd = 16, N = 16 tokens;
    LayerNorm + modulate and adaLN only differ by autocast, which is off). The 2 residual blocks
    and the final layer add these up, each amplifying what comes in by less than 10 at these weight
    scales: |Δ| <= 3·2·600·10·eps·max|y| for the output y and for each parameter's gradient. In
    float64 that is 8e-12 relative, while a form computing a different function (another head
    mapping, a dropped mask, another GELU constant) moves the output by 1e-3 or more."""
    model = _model()
    out_auto, grads_auto = _forward_backward(model, "auto")
    out_plain, grads_plain = _forward_backward(model, "plain")
    out_fast, grads_fast = _forward_backward(model, "fast")
    kappa = 3 * 2 * 600 * 10 * eps(torch.float64)
    within(out_plain, out_auto, kappa * out_auto.abs().max().expand_as(out_auto))
    for n, g in grads_auto.items():
        within(grads_plain[n], g, kappa * g.abs().max().expand_as(g))
    # on CPU "auto" is "fast"
    assert torch.equal(out_fast, out_auto)
    assert all(torch.equal(grads_fast[n], g) for n, g in grads_auto.items())
