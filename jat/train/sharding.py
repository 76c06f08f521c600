"""FSDP for the trainer (`train.distributed=fsdp`): shard the network over the processes, and turn
what a checkpoint holds into whole tensors and back, so that a sharded run writes and reads the same
consolidated files as a replicated (DDP) one, and inference and LoRA read them unchanged.

The sharding is PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), applied here rather than
through accelerate's FullyShardedDataParallelPlugin: accelerate 1.15 turns FSDP on only for
accelerator devices and, for CPU processes over gloo, silently falls back to DDP, so its path could
not be tested where the tests run. Applied by hand, the same code runs on CPU and GPU.

Each DiT block is one FSDP unit, and the root (embeddings, envelope head, final layer) another:
during the forward a block's parameters are all-gathered just before it runs and freed after; the
backward reduce-scatters each unit's gradients, so each process keeps 1/N of the parameters (as
DTensors sharded on dim 0), of the gradients, of the optimizer state (AdamW's moments follow their
parameters) and of the EMA (`jat.train.optim.EMA` averages the local shards).

Gathering (`gathered`, `model_state`, `optimizer_state`) and scattering (`load_model_state`,
`load_optimizer_state`, `shard_like`) are collectives or local slicing: every process calls them in
the same order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from jat.checkpoint import store as ckpt
from jat.config import Config, ConfigError
from jat.model.dit import JaT

log = logging.getLogger(__name__)

# whole tensors, on the CPU of the main process only (the others get empty dicts): what a writer needs
_TO_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
# whole tensors given on every process (each read the checkpoint), each cutting out its own shard
_FROM_FULL = StateDictOptions(full_state_dict=True, strict=True)


def wanted(cfg: Config, num_processes: int) -> bool:
    """Whether this run shards: train.distributed=fsdp in several processes (in one there is nothing to
    shard). ConfigError for adapter training, which FSDP does not cover."""
    if cfg.train.distributed != "fsdp":
        return False
    if cfg.lora.mode != "none":
        raise ConfigError(f"train.distributed=fsdp with lora.mode={cfg.lora.mode}: FSDP shards full "
                          "training only (adapters are small: use train.distributed=ddp)")
    if num_processes == 1:
        log.info("train.distributed=fsdp in one process: nothing to shard, the model stays whole")
    return num_processes > 1


def shard(model: JaT, device: torch.device) -> JaT:
    """Move `model` to `device` and shard it in place over all processes: one FSDP unit per DiT block,
    one root. The mesh names the device type: FSDP's default would pick CUDA whenever it exists, also
    for CPU processes (ACCELERATE_USE_CPU=1 on a GPU machine)."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    model.to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside the block, as DDP's no_sync does."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def gathered(tensors: Mapping[str, torch.Tensor], main_only: bool = False) -> dict[str, torch.Tensor]:
    """Each DTensor all-gathered into the whole tensor, plain tensors as they are (a collective: every
    process calls it). main_only: the results moved to the CPU and kept on the main process only, one
    tensor at a time (the others get an empty dict)."""
    main = not main_only or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out = {}
    for name, t in tensors.items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            out[name] = whole.detach().cpu() if main_only else whole.detach()
    return out


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` cut like `like` (a DTensor: this process's shard of it, no communication) or as it is."""
    if not isinstance(like, DTensor):
        return whole
    whole = whole.to(like.device, like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the main process (CPU), {} on the others; names as without FSDP."""
    return get_model_state_dict(model, options=_TO_MAIN)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Whole tensors (read on every process) into the sharded model; CheckpointError naming `what`
    when they do not fit."""
    ckpt.check_fits(model, state, what)
    set_model_state_dict(model, state, options=_FROM_FULL)


# --- optimizer state: the consolidated form is the plain optimizer's (parameters by index) -----------


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on the main process (CPU), in `optimizer.state_dict()`'s own format
    (parameters numbered through the groups in order), as a DDP run writes it; {} on the others."""
    named = get_optimizer_state_dict(model, optimizer, options=_TO_MAIN)
    if not named:
        return {}
    index = {name: i for i, name in enumerate(itertools.chain.from_iterable(
        g["params"] for g in named["param_groups"]))}
    return {"state": {index[name]: s for name, s in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """A consolidated optimizer state (by index, read on every process) into the sharded optimizer."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(f"the optimizer state holds {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters, this run trains {len(names)}")
    named = {"state": {names[int(i)]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                              for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=_FROM_FULL)
