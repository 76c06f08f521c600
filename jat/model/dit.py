"""The JaT-AudioSR Diffusion Transformer (docs/design.md section 3), read top-down like the paper.

    x_t [B, C, T] ─┐
                   ├─ concat on channels ─ patchify (p frames/token) ─ BottleneckPatchEmbed ─┐
    c   [B, C, T] ─┘                                                                         │
    t   [B] ─ sinusoid(t·1000) ─ MLP ─ conditioning vector ──────────────┐                   │
                                                                         ▼                   ▼
                                         depth × DiT block (adaLN-Zero, GQA + RoPE, MLP) on tokens
                                                                         │
                                         final adaLN layer ─ Linear ─ unpatchify ─ crop ─ x̂ [B, C, T]

The network predicts the clean latent (x-prediction); flow.py turns that into a velocity. GELU,
attention, LayerNorm + modulation and the adaLN linears are computed by jat/model/kernels.py, which
picks fast CPU and precision forms of the same functions (one switch: `kernels.use`, `kernels.mode`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from jat.config import ModelConfig, preset_model_config
from jat.model import kernels


def model_config(preset: str, **overrides) -> ModelConfig:
    """A named size preset (v1, v2, small, tiny) as a ModelConfig, with optional field overrides."""
    return preset_model_config(preset, **overrides)


class BottleneckPatchEmbed(nn.Module):
    """Patch tokens [B, N, 2C·p] -> hidden [B, N, D] through a narrow bottleneck."""

    def __init__(self, in_dim: int, bottleneck: int, hidden: int):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, bottleneck)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(bottleneck, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.act(self.proj1(tokens)))  # [B, N, D]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid of t·1000 (freq_i = 10000^(-2i/dim)) -> MLP -> [B, D]."""

    def __init__(self, hidden: int, freq_dim: int = 512):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period)
                          * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]  # [B, dim/2]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t, self.freq_dim)  # [B, F]
        return kernels.in_weight_precision(self.mlp, emb, self.mlp[0].weight)  # [B, D]: B rows only


class RotaryEmbedding(nn.Module):
    """1-D rotary position embedding over token index; rotates adjacent pairs (x0, x1), (x2, x3), ...

    `forward(positions)` gives the tables once per forward: cos [N, hd] with each pair's cosine
    repeated, sin [N, hd] with the pair's sine signed (-sin, +sin), so that a rotation is
    x·cos + swap(x)·sin, where swap exchanges the two members of each pair: three passes over x.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [hd/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None]  # [N, hd/2]
        cos = angles.cos().repeat_interleave(2, dim=-1)  # [N, hd]: (c0, c0, c1, c1, ...)
        sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(-2)  # [N, hd]: (-s0, s0, ...)
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, N, hd]; cos/sin [N, hd] from forward -> x rotated pairwise, in x's dtype.

        Pair (x0, x1) -> (x0·c - x1·s, x1·c + x0·s). The tables are cast to x's dtype first (bf16
        under autocast), as fused RoPE kernels do.
        """
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
        return torch.addcmul(x * cos.to(x.dtype), swapped, sin.to(x.dtype))  # [B, H, N, hd]


class Attention(nn.Module):
    """Grouped-query self-attention: H query heads share H_kv key/value heads (no repeated K/V)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        self.q = nn.Linear(hidden, num_heads * self.head_dim)
        self.k = nn.Linear(hidden, num_kv_heads * self.head_dim)
        self.v = nn.Linear(hidden, num_kv_heads * self.head_dim)
        self.out = nn.Linear(num_heads * self.head_dim, hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", d=self.head_dim)  # [B, H, N, hd]
        k = rearrange(self.k(x), "b n (h d) -> b h n d", d=self.head_dim)  # [B, Hkv, N, hd]
        v = rearrange(self.v(x), "b n (h d) -> b h n d", d=self.head_dim)  # [B, Hkv, N, hd]
        if rope is not None:
            q, k = RotaryEmbedding.apply(q, *rope), RotaryEmbedding.apply(k, *rope)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, N]
        o = kernels.attention(q, k, v, mask)  # [B, H, N, hd]
        return self.out(rearrange(o, "b h n d -> b n (h d)"))  # [B, N, D]


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2 on every token."""

    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        inner = int(hidden * ratio)
        self.fc1 = nn.Linear(hidden, inner)
        self.act = kernels.TanhGELU()
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: shift/scale/gate for attention and MLP come from the conditioning vector."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.num_kv_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope=None, key_mask=None) -> torch.Tensor:
        mods = kernels.ada_ln(self.adaLN_modulation, cond, x.dtype).chunk(6, dim=-1)  # 6 x [B, 1, D]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        h = self.attn(kernels.norm_modulate(self.norm1, x, shift_a, scale_a), rope, key_mask)  # [B, N, D]
        x = torch.addcmul(x, gate_a, h)  # x + gate·h
        h = self.mlp(kernels.norm_modulate(self.norm2, x, shift_m, scale_m))  # [B, N, D]
        x = torch.addcmul(x, gate_m, h)
        return x  # [B, N, D]


class EnvelopeHead(nn.Module):
    """The log-envelope e [B, E, T] of what the condition lacks, from the condition alone.

    It sees neither t nor z_t: the envelope is a property of the signal, not of the noise level, and
    a head on the DiT's output learned t-dependent envelopes that only the well-sampled ends of the
    U-shaped t distribution pinned down (mid-t samples then came out 30 dB too loud). Input: the
    condition's log-RMS per frame on `IN_BANDS` equal bands of channels [B, IN_BANDS, T], plus its
    mean over the segment; temporal convolutions of kernel 5 with the given dilations (GELU after
    each); a zero-initialised 1x1 output (e = 0 at start). With `spread` it returns 2E channels: the E
    log-levels, then E log-spreads of them (`FlowMatching.envelope_level`, flow.envelope_target lognormal).

    With `aligned` K > 0 it also sees the K input bands at and below the condition's band edge (the
    highest band whose RMS over the segment reaches CARRIED_RMS), top first, with their segment means,
    and the edge's place (edge / IN_BANDS): the same features at every cutoff, as the noise fill reads
    the octave below the cutoff whatever it is, where the absolute bands ask the head to learn each
    cutoff's mapping on its own (docs/quality.md "Where the error is").
    """

    IN_BANDS = 64
    KERNEL = 5
    # a band is carried when its RMS reaches 2 x flow.band_threshold's default (0.1): band_prior's
    # absent < 1/2, in normalised units
    CARRIED_RMS = 0.2

    def __init__(self, channels: int, bands: int, hidden: int = 128, dilations: Sequence[int] = (1, 1),
                 spread: bool = False, aligned: int = 0):
        super().__init__()
        self.channels, self.bands, self.spread, self.aligned = channels, bands, spread, aligned
        layers: list[nn.Module] = []
        width = 2 * self.IN_BANDS + (2 * aligned + 1 if aligned else 0)
        for d in dilations:
            layers += [nn.Conv1d(width, hidden, self.KERNEL, padding=d * (self.KERNEL // 2), dilation=d),
                       nn.GELU()]
            width = hidden
        layers.append(nn.Conv1d(width, 2 * bands if spread else bands, 1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, T = c.shape
        power = F.adaptive_avg_pool1d(c.float().square().transpose(1, 2), self.IN_BANDS)  # [B, T, 64]
        feat = 0.125 * torch.log(power.transpose(1, 2) + 1e-6)  # [B, 64, T] log-RMS / 4, about [-2, 1]
        m = feat.new_ones(B, 1, T) if mask is None else mask[:, None].to(feat.dtype)  # [B, 1, T]
        frames = m.sum(-1, keepdim=True).clamp_min(1)  # [B, 1, 1]
        mean = (feat * m).sum(-1, keepdim=True) / frames  # [B, 64, 1]
        parts = [feat, mean.expand_as(feat)]
        if self.aligned:
            seg_power = (power.transpose(1, 2) * m).sum(-1) / frames[..., 0]  # [B, 64]
            bands = torch.arange(self.IN_BANDS, device=c.device)  # [64]
            edge = torch.where(seg_power >= self.CARRIED_RMS**2, bands, 0).amax(1)  # [B] (0: none carried)
            below = (edge[:, None] - torch.arange(self.aligned, device=c.device)).clamp_min(0)  # [B, K]
            top = feat.gather(1, below[..., None].expand(B, self.aligned, T))  # [B, K, T]
            place = (edge.to(feat.dtype) / self.IN_BANDS)[:, None, None].expand(B, 1, T)  # [B, 1, T]
            parts += [top, mean.gather(1, below[..., None]).expand_as(top), place]
        return self.net(torch.cat(parts, 1))  # [B, E (x 2 with spread), T]


class FinalLayer(nn.Module):
    """LayerNorm, adaLN shift/scale, Linear to C·p values per token."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = kernels.ada_ln(self.adaLN_modulation, cond, x.dtype).chunk(2, dim=-1)  # [B, 1, D] each
        return self.linear(kernels.norm_modulate(self.norm, x, shift, scale))  # [B, N, C·p]


class JaT(nn.Module):
    """JaT-AudioSR DiT: (x_t, t, c) -> predicted clean latent x̂, any length T >= 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, p, d = cfg.in_channels, cfg.patch_size, cfg.hidden_size
        self.patch_embed = BottleneckPatchEmbed(2 * c * p, cfg.bottleneck_dim, d)
        self.t_embedder = TimestepEmbedder(d, cfg.time_freq_dim)
        if cfg.pos_embed == "rope":
            self.rope = RotaryEmbedding(d // cfg.num_heads, cfg.rope_theta)
            self.pos_table = None
        else:
            self.rope = None
            self.pos_table = nn.Parameter(torch.zeros(1, cfg.max_tokens, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, c * p)
        # envelope_bands > 0: a per-frame log-envelope for flow.precondition=band, from c alone
        self.envelope = (EnvelopeHead(c, cfg.envelope_bands, cfg.envelope_hidden, cfg.envelope_dilations,
                                      cfg.envelope_spread, cfg.envelope_aligned)
                         if cfg.envelope_bands else None)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, then adaLN-Zero: every block starts as the identity and the head outputs 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.pos_table is not None:
            nn.init.normal_(self.pos_table, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t, c: [B, C, T]; t: [B] in [0, 1]; mask: optional [B, T] bool of valid frames.

        Returns x̂ [B, C, T] (with `envelope_bands` E > 0: [B, C + E, T], C + 2E with a spread, the
        envelope channels last, read by FlowMatching.predict_x). Padded frames (mask False) are hidden
        from attention when a whole token is padding.
        """
        p = self.cfg.patch_size
        T = x_t.shape[-1]
        pad = (-T) % p
        h = F.pad(torch.cat([x_t, c], dim=1), (0, pad))  # [B, 2C, T_pad]
        tokens = rearrange(h, "b c (n p) -> b n (c p)", p=p)  # [B, N, 2C·p]
        x = self.patch_embed(tokens)  # [B, N, D]
        N = x.shape[1]

        rope = None
        if self.rope is not None:
            rope = self.rope(torch.arange(N, device=x.device))
        else:
            if N > self.pos_table.shape[1]:
                raise ValueError(f"{N} tokens exceed the learned position table ({self.pos_table.shape[1]})")
            x = x + self.pos_table[:, :N].to(x.dtype)

        key_mask = None
        if mask is not None and not bool(mask.all()):
            key_mask = F.pad(mask, (0, pad)).view(mask.shape[0], N, p).any(-1)  # [B, N]

        cond = self.t_embedder(t)  # [B, D]
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, rope, key_mask, use_reentrant=False)
            else:
                x = block(x, cond, rope, key_mask)  # [B, N, D]
        out = self.final_layer(x, cond)  # [B, N, C·p]
        out = rearrange(out, "b n (c p) -> b c (n p)", p=p)[..., :T]  # [B, C, T]
        if self.envelope is None:
            return out
        return torch.cat([out, self.envelope(c, mask).to(out.dtype)], 1)  # [B, C + E (or 2E), T]


def parameter_breakdown(model: JaT) -> dict[str, int]:
    """Parameter counts by part (patch embed, time embed, positions, blocks, final layer) and total."""
    parts = {
        "patch_embed": model.patch_embed,
        "t_embedder": model.t_embedder,
        "blocks.attention": [b.attn for b in model.blocks],
        "blocks.mlp": [b.mlp for b in model.blocks],
        "blocks.adaLN": [b.adaLN_modulation for b in model.blocks],
        "final_layer": model.final_layer,
    }
    out = {}
    for name, mods in parts.items():
        mods = mods if isinstance(mods, list) else [mods]
        out[name] = sum(p.numel() for m in mods for p in m.parameters())
    out["pos_table"] = model.pos_table.numel() if model.pos_table is not None else 0
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def format_parameter_breakdown(model: JaT) -> str:
    """A table of `parameter_breakdown` for printing."""
    rows = parameter_breakdown(model)
    total = rows["total"]
    lines = [f"{'part':<18}{'params':>14}{'share':>9}"]
    for name, n in rows.items():
        lines.append(f"{name:<18}{n:>14,}{100 * n / total:>8.2f}%")
    return "\n".join(lines)
