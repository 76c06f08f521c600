"""Benchmark harness: this machine's yardsticks, exact FLOP counts, and timed training/inference.

Every figure is measured in one run beside its yardstick: achieved FLOP/s against the measured
matmul peak (MFU), the optimizer step against its bandwidth bound, ours against a plain reference.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jat.codecs import latent_frames
from jat.config import FlowConfig, ModelConfig
from jat.model.dit import JaT
from jat.model.flow import FlowMatching
from jat.model.kernels import cast_linears_
from jat.runtime import tune_cpu_runtime

# --- yardsticks --------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
              device: str | torch.device = "cpu") -> float:
    """Fastest of `repeats` timed calls after `warmup` untimed ones (seconds); on a GPU `device` each
    call is timed until the device has finished its work."""
    device = torch.device(device)

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        call()
        times.append(time.perf_counter() - tic)
    return min(times)


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 3072, 4096), repeats: int = 5,
                device: str | torch.device = "cpu") -> float:
    """Achieved FLOP/s of large square matmuls, the best over a few sizes: this device's practical peak
    (on a GPU each timed call waits for the device)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        best = max(best, 2 * n**3 / best_time(lambda: a @ b, repeats, device=device))  # noqa: B023
    return best


def copy_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: the better of a copy (reads and writes each byte: 2 x size moved)
    and an in-place axpy y += a x (3 x size moved), on buffers far larger than the caches."""
    x = torch.empty(mbytes * 2**20 // 4, dtype=torch.float32).normal_()
    y = torch.zeros_like(x)
    copy = 2 * x.numel() * 4 / best_time(lambda: y.copy_(x), repeats)
    axpy = 3 * x.numel() * 4 / best_time(lambda: y.add_(x, alpha=0.5), repeats)
    return max(copy, axpy)


class PeakRSS(contextlib.AbstractContextManager):
    """Peak resident memory (bytes) above the level at entry, sampled from /proc every few ms."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


# --- exact FLOP counts -------------------------------------------------------------------------


def tokenwise_weights(cfg: ModelConfig) -> int:
    """Weights of every matmul applied per token: patch embed, block q/k/v/out/fc1/fc2, final linear."""
    C, p, D = cfg.in_channels, cfg.patch_size, cfg.hidden_size
    kv = cfg.num_kv_heads * cfg.hidden_size // cfg.num_heads
    inner = int(D * cfg.mlp_ratio)
    patch = 2 * C * p * cfg.bottleneck_dim + cfg.bottleneck_dim * D
    block = D * D + 2 * D * kv + D * D + 2 * D * inner
    return patch + cfg.depth * block + D * C * p


def forward_flops(cfg: ModelConfig, batch: int, frames: int) -> int:
    """Forward FLOPs: 2 x weights x tokens for token-wise matmuls plus 4 N^2 d per attention layer
    (per-sample adaLN and time-embedding work excluded)."""
    N = math.ceil(frames / cfg.patch_size)
    return batch * (2 * tokenwise_weights(cfg) * N + cfg.depth * 4 * N * N * cfg.hidden_size)


def train_flops(cfg: ModelConfig, batch: int, frames: int) -> int:
    return 3 * forward_flops(cfg, batch, frames)


# --- the plain reference ------------------------------------------------------------------------


def ref_rope(N: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, hd/2] of the angles pos·theta^(-2i/hd)."""
    angles = torch.arange(N).float()[:, None] * theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    return angles.cos(), angles.sin()


def ref_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) by the angle table, computed in fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class RefBlock(nn.Module):
    """V2 block written plainly: explicit softmax attention with K/V repeated by repeat_interleave."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, self.h, self.hkv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        self.hd = D // self.h
        self.q, self.k = nn.Linear(D, D), nn.Linear(D, self.hkv * self.hd)
        self.v, self.out = nn.Linear(D, self.hkv * self.hd), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, int(D * cfg.mlp_ratio)), nn.Linear(int(D * cfg.mlp_ratio), D)
        self.ada = nn.Linear(D, 6 * D)

    def forward(self, x, cond, rope):
        B, N, D = x.shape
        s1, c1, g1, s2, c2, g2 = self.ada(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)
        h = F.layer_norm(x, (D,), eps=1e-6) * (1 + c1) + s1
        q = self.q(h).view(B, N, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(B, N, self.hkv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, N, self.hkv, self.hd).transpose(1, 2)
        q, k = ref_rotate(q, *rope), ref_rotate(k, *rope)
        k = k.repeat_interleave(self.h // self.hkv, dim=1)
        v = v.repeat_interleave(self.h // self.hkv, dim=1)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), dim=-1)
        x = x + g1 * self.out((w @ v).transpose(1, 2).reshape(B, N, D))
        h = F.layer_norm(x, (D,), eps=1e-6) * (1 + c2) + s2
        return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class RefJaT(nn.Module):
    """The plain reference V2: same shapes and FLOPs as `JaT`, nothing fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, p, D = cfg.in_channels, cfg.patch_size, cfg.hidden_size
        self.cfg = cfg
        self.embed1, self.embed2 = nn.Linear(2 * C * p, cfg.bottleneck_dim), nn.Linear(cfg.bottleneck_dim, D)
        self.t1, self.t2 = nn.Linear(cfg.time_freq_dim, D), nn.Linear(D, D)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.depth))
        self.final_ada, self.final = nn.Linear(D, 2 * D), nn.Linear(D, C * p)

    def forward(self, x_t, t, c, mask=None):
        B, C, T = x_t.shape
        p = self.cfg.patch_size
        h = F.pad(torch.cat([x_t, c], 1), (0, (-T) % p))
        N = h.shape[-1] // p
        x = self.embed2(F.gelu(self.embed1(h.view(B, 2 * C, N, p).permute(0, 2, 1, 3).reshape(B, N, -1))))
        half = self.cfg.time_freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        args = t[:, None] * 1000 * freqs[None]
        cond = self.t2(F.silu(self.t1(torch.cat([args.cos(), args.sin()], -1))))
        rope = ref_rope(N, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta)
        for block in self.blocks:
            x = block(x, cond, rope)
        shift, scale = self.final_ada(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        out = self.final(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift)
        return out.view(B, N, C, p).permute(0, 2, 1, 3).reshape(B, C, N * p)[..., :T]


# --- timed runs --------------------------------------------------------------------------------


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def measure_train(model: nn.Module, opt: torch.optim.Optimizer, cfg: ModelConfig, batch: int, frames: int,
                  dtype: str, repeats: int) -> dict[str, float]:
    """Time forward+backward and the optimizer step of one training step; peak memory above entry."""
    C = cfg.in_channels
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(batch, C, frames, generator=g), torch.randn(batch, C, frames, generator=g)
    flow = FlowMatching(FlowConfig(cond_dropout=0.0))

    def fwd_bwd():
        model.zero_grad(set_to_none=True)  # as the trainer does after each optimizer step
        with autocast(dtype):
            loss, _ = flow.loss(model, x, c, generator=torch.Generator().manual_seed(1))
        loss.backward()

    with PeakRSS() as mem:
        t_fb = best_time(fwd_bwd, repeats)
        t_opt = best_time(opt.step, repeats)
    opt.zero_grad(set_to_none=True)
    flops = train_flops(cfg, batch, frames)
    tokens = batch * math.ceil(frames / cfg.patch_size)
    return {"fwd_bwd_s": t_fb, "opt_s": t_opt, "step_s": t_fb + t_opt, "flops": flops,
            "fwd_bwd_flops_per_s": flops / t_fb, "tokens_per_s": tokens / (t_fb + t_opt),
            "peak_mem_mb": mem.peak / 2**20}


def optimizer_bytes(model: nn.Module) -> int:
    """Bytes an AdamW step must move: read param, grad, m, v and write param, m, v (fp32)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 7 * 4 * n


def measure_inference(model: nn.Module, cfg: ModelConfig, seconds: float, steps: int, solver: str,
                      dtype: str) -> dict[str, float]:
    """Network time of sampling `seconds` of audio (batch 1) and its FLOP rate."""
    frames = latent_frames(seconds)
    c = torch.randn(1, cfg.in_channels, frames, generator=torch.Generator().manual_seed(0))
    flow = FlowMatching(FlowConfig(cond_dropout=0.0))
    model.eval()
    if dtype == "bf16":
        cast_linears_(model, torch.bfloat16)  # as the Upsampler does
    tune_cpu_runtime()  # as the Upsampler does on CPU, once its model is cast

    def run(n: int = steps):
        with torch.no_grad(), autocast(dtype):
            flow.sample(model, c, steps=n, solver=solver, noise=torch.zeros_like(c))

    run(1)  # warm-up: one short sample of the same shapes
    t = best_time(run, repeats=2, warmup=0)
    nfe = steps if solver == "euler" else 2 * steps - 1
    flops = nfe * forward_flops(cfg, 1, frames)
    return {"network_s": t, "nfe": nfe, "flops_per_s": flops / t, "network_rtf": t / seconds}


def build(kind: str, cfg: ModelConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Ours (JaT + fused AdamW, as the trainer builds it) or the plain reference (default AdamW)."""
    if kind not in ("ours", "ref"):
        raise ValueError(f"unknown implementation '{kind}' (ours or ref)")
    torch.manual_seed(0)
    if kind == "ours":
        model = JaT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        model = RefJaT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # non-zero gates so every block does real work in backward too
        if p.dim() < 2:
            nn.init.normal_(p, std=0.02)
    return model, opt


# --- fine-tuning modes -------------------------------------------------------------------------


def finetune_step(mode: str, preset: str = "v2", batch: int = 2, seconds: float = 6.0, dtype: str = "fp32",
                  repeats: int = 2) -> dict[str, float]:
    """One training step of full fine-tuning, LoRA or QLoRA (r 16 on q, k, v, out, fc1, fc2); call it
    in a fresh process: peak memory is the process's, from before the model is built."""
    from jat.config import LoraConfig
    from jat.model.dit import model_config
    from jat.model.lora import apply_lora, lora_report

    cfg = model_config(preset)
    with PeakRSS() as mem:
        torch.manual_seed(0)
        model = JaT(cfg)
        if mode != "full":
            model = apply_lora(model, LoraConfig(mode=mode))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        report = lora_report(model)
        tune_cpu_runtime()  # as the trainer does on CPU once the model is built
        r = measure_train(model, opt, cfg, batch, latent_frames(seconds), dtype, repeats)
    return {"step_s": r["step_s"], "fwd_bwd_s": r["fwd_bwd_s"], "opt_s": r["opt_s"],
            "peak_mem_mb": mem.peak / 2**20, "trainable": report["trainable"], "frozen": report["frozen"],
            "frozen_mb": report["frozen_bytes"] / 2**20}


def named_config(name: str):
    """configs/<name>.yaml as a Config."""
    from jat.config import Config, resolve_config_path

    return Config.from_yaml(resolve_config_path(f"{name}.yaml"))


def train_case(name: str, kind: str, dtype: str, batch: int, seconds: float,
               repeats: int) -> dict[str, float]:
    """One (config, implementation, dtype, batch) training measurement; call it in a fresh process so
    peak memory (weights, gradients, optimizer state, activations) and timings are its own.

    Ours runs as the trainer runs it on CPU, with `tune_cpu_runtime()` (JAT_CPU_TUNING=0 turns
    that off); the reference runs as a plain PyTorch script would, unless kind is `ref+tuned`.
    """
    cfg = named_config(name).model
    tune = kind in ("ours", "ref+tuned")
    with PeakRSS() as mem:
        model, opt = build(kind.removesuffix("+tuned"), cfg)
        tuned = tune and tune_cpu_runtime()["keep_freed_memory"]
        r = measure_train(model, opt, cfg, batch, latent_frames(seconds), dtype, repeats)
    r["cpu_tuned"] = tuned
    r["peak_mem_mb"] = mem.peak / 2**20
    r["optimizer_bytes"] = optimizer_bytes(model)
    return r


if __name__ == "__main__":  # one measurement in a fresh process, printed as a JSON line
    import json
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "finetune":  # finetune MODE [PRESET]
        print(json.dumps(finetune_step(sys.argv[2], *(sys.argv[3:4] or ["v2"]))))
    elif len(sys.argv) == 8 and sys.argv[1] == "train":  # train NAME KIND DTYPE BATCH SECONDS REPEATS
        name, kind, dtype, batch, seconds, repeats = sys.argv[2:]
        print(json.dumps(train_case(name, kind, dtype, int(batch), float(seconds), int(repeats))))
