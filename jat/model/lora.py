"""LoRA and QLoRA fine-tuning of a trained JaT (docs/design.md section 6).

One adapter module, `LoRALinear`, wraps any frozen base linear, full precision (`lora` mode) or
bitsandbytes NF4 with double quantization (`qlora` mode):

    h = W0 x + (alpha / r) · B A dropout(x)        A [r, in] Kaiming-uniform, B [out, r] zeros

so the adapted model equals its base at step 0. With `LoraConfig.dora` it is DoRA (weight-decomposed
LoRA, Liu et al. 2024), as PEFT's `use_dora`:

    W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_row     m [out] trainable, initialised to ||W0||_row

(the norm of each output row over the inputs, detached from the backward as the paper suggests), so
at step 0 m / ||W0|| is exactly 1. `apply_lora` injects adapters into the DiT block linears whose
names match `LoraConfig.targets` (or the top `select_fraction` of them by the signal-to-noise ratio
of their spectra, jat/model/spectrum.py), quantizes the frozen block linears in qlora mode,
freezes everything else and optionally adds a temporal adapter after every block. Adapter
parameters are the only trainable tensors; `adapter_state_dict` holds exactly them (no
quantization state), `load_adapter` puts them back on a freshly adapted base, and `merge_lora`
folds them into plain full-precision linears for export.

The temporal adapter's frozen down/up projections are not part of the base checkpoint: they are
drawn from a fixed per-block seed, so base + adapter file rebuild them exactly in a new process.

This module is a pure model transform: adapter files and checkpoint loading live in jat/checkpoint/
(`adapters.py`, `load.py`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from jat.config import LoraConfig
from jat.model.dit import DiTBlock, JaT

# names of the trainable parts (lora_magnitude: DoRA's magnitude vector m)
ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_magnitude", "dw_conv", "pw_conv", "gamma"})
NORM_FLOOR = 1e-12  # DoRA: smaller row norms count as this, so a zero row of W0 stays ~0 instead of 0 / 0
QUANT_KEY_PARTS = ("absmax", "quant_map", "quant_state", "nested_")  # bitsandbytes state-dict entries
TEMPORAL_SEED = 20_251_106  # + block index: the frozen temporal projections' initialisation

log = logging.getLogger(__name__)


# --- the adapter module -------------------------------------------------------------------------


def is_quantized(linear: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (its weight carries a quant_state)."""
    return getattr(getattr(linear, "weight", None), "quant_state", None) is not None


def _bitsandbytes():
    """bitsandbytes, an optional dependency (only 4-bit bases need it), or an error naming the extra."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as exc:
        raise ImportError("4-bit (qlora) bases need bitsandbytes: pip install 'jat-audiosr[qlora]' "
                          f"({exc})") from None
    return bitsandbytes


def quantize_linear(linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A frozen bitsandbytes `Linear4bit` (NF4, double quantization) holding `linear`'s weights.

    Quantization happens on the weight's device. The CPU inference repacking of bitsandbytes
    (bf16-only kernel, undoes double quantization) is switched off, so train and eval share one
    numerical path and the weights stay in their canonical layout.
    """
    bnb = _bitsandbytes()
    w = linear.weight.detach()
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(w.float(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4", module=q).to(w.device)  # quantized here
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    q.support_avx512bf16_for_cpu = False
    return q


def dequantize_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight [out, in] of a plain or 4-bit linear, in fp32."""
    if not is_quantized(linear):
        return linear.weight.detach().float()
    bnbf = _bitsandbytes().functional
    w = linear.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError("4-bit weight is in bitsandbytes' CPU inference packing: build it with "
                           "quantize_linear")
    return bnbf.dequantize_4bit(w.data, w.quant_state).float()


class LoRALinear(nn.Module):
    """A frozen base linear (plain or 4-bit) plus a trainable low-rank update (alpha / r) · B A; with
    `dora`, DoRA: the adapted weight's rows renormalised to a trainable magnitude `lora_magnitude`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling, self.dora = rank, alpha, alpha / rank, dora
        device = base.bias.device if base.bias is not None else base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear (and PEFT)
        nn.init.zeros_(self.lora_B.weight)  # the update starts at exactly zero
        if dora:  # m = ||W0 + s B A||_row = ||W0||_row: the same computation as forward's, so m / norm is 1
            self.lora_magnitude = nn.Parameter(self.weight_norm())

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # [..., out]
        if not self.dora:
            return result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        # PEFT's DoRA: m / ||V|| · (W0 x + s B A x) + b, as a correction on the base output; with dropout
        # (training) W0 x is recomputed on the dropped-out input, as the low-rank path sees it
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_result = result if self.base.bias is None else result - self.base.bias
        else:
            x = self.dropout(x)
            base_result = F.linear(x, self.base_weight().to(x.dtype))
        scale = (self.lora_magnitude / self.weight_norm()).view(1, -1)  # [1, out]; the norm is detached
        dora = (scale - 1) * base_result + scale * self.lora_B(self.lora_A(x)) * self.scaling
        return result + dora.to(result.dtype)

    def base_weight(self) -> torch.Tensor:
        """W0 [out, in]: the plain base's weight, or the 4-bit one dequantized (fp32)."""
        return dequantize_weight(self.base) if is_quantized(self.base) else self.base.weight.detach()

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) · B A as a dense [out, in] fp32 matrix."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """DoRA's ||W0 + s B A||_row [out] in the adapter's dtype (fp32 unless converted), outside
        autocast; detached (no gradient: the DoRA paper's section 4.3, and PEFT)."""
        dtype, device = self.lora_A.weight.dtype, self.lora_A.weight.device.type
        with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext():
            w = self.base_weight().to(dtype) + self.scaling * (self.lora_B.weight @ self.lora_A.weight)
            return torch.linalg.norm(w, dim=1).to(dtype).clamp_min(NORM_FLOOR)

    def merged_weight(self) -> torch.Tensor:
        """The adapted weight [out, in] in fp32: W0 + s B A; DoRA: m / ||W0 + s B A|| ⊙ (W0 + s B A)."""
        with torch.no_grad():
            w = self.base_weight().float() + self.delta_weight()
            if self.dora:
                w = (self.lora_magnitude.float() / self.weight_norm().float())[:, None] * w
        return w

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dora={self.dora}, quantized={is_quantized(self.base)}"


def plain_linear(linear: nn.Module) -> nn.Linear:
    """A LoRALinear, 4-bit or plain linear -> an fp32 nn.Linear computing the same map (merged)."""
    base = linear.base if isinstance(linear, LoRALinear) else linear
    weight = linear.merged_weight() if isinstance(linear, LoRALinear) else dequantize_weight(base)
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if base.bias is not None:
            out.bias.copy_(base.bias.float())
    return out


# --- the temporal adapter -----------------------------------------------------------------------


def _seeded_linear(fan_in: int, fan_out: int, seed: int) -> nn.Linear:
    """nn.Linear with its default initialisation drawn from a private generator (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fan_in, fan_out)
    with torch.no_grad():
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
        nn.init.uniform_(lin.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=g)
    return lin


class TemporalAdapter(nn.Module):
    """Bottleneck adapter over the token axis (AdaTAD): x + gamma · up(pw(dw(GELU(down(x))))).

    down/up are frozen (4-bit in qlora mode) seeded linears carrying LoRA adapters; the depthwise
    temporal conv, the 1x1 conv and gamma (zero-initialised: identity at step 0) train in full.
    With `lora=None` down/up are plain trainable linears (the merged, exported form).
    """

    def __init__(self, dim: int, bottleneck: int, kernel: int, seed: int, lora: LoraConfig | None = None,
                 quantize: bool = False, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        down = _seeded_linear(dim, bottleneck, seed).to(device)
        up = _seeded_linear(bottleneck, dim, seed + 1_000_003).to(device)
        if lora is not None:
            if quantize:
                down, up = quantize_linear(down, compute_dtype), quantize_linear(up, compute_dtype)
            down = LoRALinear(down, lora.rank, lora.alpha, lora.dropout, lora.dora)
            up = LoRALinear(up, lora.rank, lora.alpha, lora.dropout, lora.dora)
        self.down, self.up = down, up
        self.dw_conv = nn.Conv1d(bottleneck, bottleneck, kernel, padding="same", groups=bottleneck,
                                 device=device)
        self.pw_conv = nn.Conv1d(bottleneck, bottleneck, 1, device=device)
        self.gamma = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.gelu(self.down(x))  # [B, N, m]
        if key_mask is not None:  # padding tokens must not leak into their neighbours through the conv
            h = h * key_mask[..., None].to(h.dtype)
        h = rearrange(h, "b n m -> b m n")
        h = self.pw_conv(self.dw_conv(h))  # [B, m, N]
        h = self.up(rearrange(h, "b m n -> b n m"))  # [B, N, D]
        return x + self.gamma * h  # [B, N, D]


class AdaptedBlock(DiTBlock):
    """A DiT block followed by a temporal adapter. Adopts the block's submodules, so its state-dict
    keys are the block's own plus `temporal.*`."""

    def __init__(self, block: DiTBlock, temporal: TemporalAdapter):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.temporal = temporal
        self.train(block.training)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope=None, key_mask=None) -> torch.Tensor:
        return self.temporal(super().forward(x, cond, rope, key_mask), key_mask)  # [B, N, D]


def add_temporal_adapters(model: JaT, cfg: LoraConfig, lora: bool, quantize: bool,
                           compute_dtype: torch.dtype) -> None:
    device = next(model.parameters()).device
    for i, block in enumerate(model.blocks):
        temporal = TemporalAdapter(model.cfg.hidden_size, cfg.temporal_dim, cfg.temporal_kernel,
                                   TEMPORAL_SEED + i, cfg if lora else None, quantize, compute_dtype, device)
        model.blocks[i] = AdaptedBlock(block, temporal)


# --- inject, freeze, report -------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    """`q` matches blocks.3.attn.q; `attn.*`, `blocks.0.*` or `*.fc?` match by glob on the name."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def block_linears(model: JaT) -> dict[str, nn.Linear]:
    """Every linear inside the DiT blocks (temporal adapters excluded), by qualified name."""
    out = {}
    for name, m in model.blocks.named_modules(prefix="blocks"):
        if isinstance(m, LoRALinear):
            raise ValueError(f"{name}: model already carries LoRA adapters")
        if isinstance(m, nn.Linear) and ".temporal." not in name:
            out[name] = m
    return out


def is_adapter_key(name: str) -> bool:
    """True for the name of an adapter parameter (what trains and what an adapter file holds)."""
    return not ADAPTER_PARTS.isdisjoint(name.split("."))


def select_targets(model: JaT, patterns: list[str], fraction: float) -> list[str]:
    """The block linears matching `patterns` that layer selection by signal-to-noise ratio keeps (the
    top `fraction` of each kind, jat/model/spectrum.py), as explicit names; logs the ranked table."""
    from jat.model.spectrum import format_snr_table, rank_layers, select_layers

    candidates = {n: m for n, m in block_linears(model).items() if any(_matches(n, p) for p in patterns)}
    ranked = rank_layers(candidates)
    chosen = select_layers(ranked, fraction)
    log.info("lora.select_fraction=%g: %d of %d block linears by SNR\n%s", fraction, len(chosen),
             len(candidates), format_snr_table(ranked, chosen))
    return chosen


def lora_targets(model: nn.Module) -> list[str]:
    """The names of the block linears carrying LoRA adapters (temporal adapters' projections excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and ".temporal." not in n]


def apply_lora(model: JaT, cfg: LoraConfig, compute_dtype: torch.dtype | None = None) -> JaT:
    """Adapt `model` in place for fine-tuning (returns it); mode `none` leaves it unchanged.

    Block linears matching `cfg.targets` (with `cfg.select_fraction`, the top fraction of those by
    SNR: `select_targets`) get `LoRALinear` adapters (DoRA with `cfg.dora`); in qlora mode every block linear
    is first quantized to NF4 (4-bit compute in `compute_dtype`: bf16 when the model is on CUDA,
    else fp32). Everything but the adapters is frozen. Quantize on the device you train on:
    move the model there first.
    """
    if cfg.mode == "none":
        return model
    device = next(model.parameters()).device
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantize = cfg.mode == "qlora"
    linears = block_linears(model)
    unmatched = [p for p in cfg.targets if not any(_matches(n, p) for n in linears)]
    if unmatched:
        raise ValueError(f"lora.targets: {unmatched} match no linear in the DiT blocks "
                         f"(names look like {next(iter(linears))})")
    targets = cfg.targets
    if cfg.select_fraction is not None:  # the full-precision weights' spectra, before any quantization
        targets = select_targets(model, cfg.targets, cfg.select_fraction)
    model.requires_grad_(False)
    for name, linear in linears.items():
        new = quantize_linear(linear, compute_dtype) if quantize else linear
        if any(_matches(name, p) for p in targets):
            new = LoRALinear(new, cfg.rank, cfg.alpha, cfg.dropout, cfg.dora)
        if new is not linear:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
    if cfg.temporal_adapter:
        add_temporal_adapters(model, cfg, lora=True, quantize=quantize, compute_dtype=compute_dtype)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable != {n for n, _ in model.named_parameters() if is_adapter_key(n)}:
        raise RuntimeError(f"adapter/frozen split is wrong: trainable {sorted(trainable)[:4]}...")
    return model


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def lora_report(model: nn.Module) -> dict[str, float]:
    """Trainable and frozen parameter counts (4-bit weights counted as their logical size), the
    trainable fraction of all parameters, and the bytes held by the frozen and trainable tensors
    (4-bit: packed data plus quantization statistics)."""
    trainable = frozen = 0
    frozen_t, trainable_t = [], []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n = math.prod(qs.shape) if qs is not None else p.numel()
        (trainable_t if p.requires_grad else frozen_t).append(p.data)
        if qs is not None:
            frozen_t.extend(v for v in qs.as_dict().values() if torch.is_tensor(v))
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    total = trainable + frozen
    return {"trainable": trainable, "frozen": frozen, "total": total, "ratio": trainable / max(total, 1),
            "frozen_bytes": _tensor_bytes(frozen_t), "trainable_bytes": _tensor_bytes(trainable_t)}


def format_lora_report(r: dict[str, float]) -> str:
    return (f"parameters: {r['trainable']:,} trainable, {r['frozen']:,} frozen "
            f"(trainable {100 * r['ratio']:.3f} % of {r['total']:,}); "
            f"frozen weights hold {r['frozen_bytes'] / 2**20:.1f} MiB")


# --- adapter state and files ------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters only (LoRA A/B, DoRA magnitudes, temporal convs and gamma): no base, no
    quant state."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_key(n)}


def load_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model already adapted with the same LoraConfig; strict."""
    quant = [k for k in state if any(s in k for s in QUANT_KEY_PARTS)]
    if quant:
        raise ValueError(f"adapter state holds quantization state ({quant[:3]}): not an adapter")
    params = dict(model.named_parameters())
    expected = {n for n in params if is_adapter_key(n)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"adapter does not fit the model: {len(missing)} missing ({missing[:4]}), "
                         f"{len(unexpected)} unexpected ({unexpected[:4]})")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: adapter shape {tuple(value.shape)} does not fit "
                                 f"the model's {tuple(params[name].shape)}")
            params[name].copy_(value)


# --- merge ---------------------------------------------------------------------------------------


def merge_lora(model: JaT) -> JaT:
    """Fold every adapter into its base in place: dequantize, add (alpha / r) B A (DoRA: and rescale
    each row to its magnitude, m / ||W0 + s B A|| ⊙ (W0 + s B A)), and replace each
    LoRALinear or 4-bit linear by a full-precision nn.Linear. Returns the (plain, trainable) model;
    temporal adapters stay, with plain down/up projections."""
    replace = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    inside = tuple(r + "." for r in replace)  # bases of the LoRALinears: replaced with them
    replace += [n for n, m in model.named_modules() if is_quantized(m) and not n.startswith(inside)]
    for name in replace:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain_linear(model.get_submodule(name)))
    return model.requires_grad_(True)


