"""Optimisation pieces of training: AdamW with its parameter groups, the learning-rate schedule, and
the EMA of the weights that sampling uses."""

from __future__ import annotations

import math

import torch

from jat.config import Config
from jat.train.sharding import shard_like


class EMA:
    """Exponential moving average of the trainable parameters (fp32, or the parameters' own precision
    where it is wider), with the usual warm-up
    decay min(decay, (1 + n) / (10 + n)) so short runs are not dominated by the initial weights.

    Under FSDP (jat/train/sharding.py) the parameters are DTensors and so is each average: every
    process averages its own shards, 1/N of the copy; `state_dict` then holds DTensors, and
    `load_state_dict` takes whole tensors and keeps each process's shard."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [_wide(p).clone() for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        d = min(self.decay, (1 + num_updates) / (10 + num_updates))
        params = [_wide(p) for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1 - d)

    def state_dict(self, model: torch.nn.Module, full: bool = True) -> dict[str, torch.Tensor]:
        """The model's full state with trainable parameters replaced by their averages; with
        full=False the averages alone (LoRA modes: the adapter, no frozen base or quantization state)."""
        state = dict(model.state_dict()) if full else {}
        state.update(zip(self.names, self.shadow, strict=True))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(shard_like(state[name], self.shadow[i]))


def _wide(p: torch.Tensor) -> torch.Tensor:
    """p detached, in float32 or wider (bf16/fp16 weights average in fp32, float64 ones stay)."""
    return p.detach().to(torch.promote_types(p.dtype, torch.float32))


def lr_lambda(cfg: Config):
    """Linear warm-up, then cosine decay to min_lr_ratio or constant."""
    o, total = cfg.optim, cfg.train.max_steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: torch.nn.Module, cfg: Config, device_type: str) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; weight decay on matrices only (p.dim() >= 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel (CUDA and CPU) is ~10x faster than the per-tensor loop on CPU: one pass over memory
    fused = cfg.optim.fused if cfg.optim.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             fused=fused or None, foreach=None if fused else True)
