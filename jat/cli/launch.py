"""A command's place among `accelerate launch`'s processes (jat-train, jat-eval, jat-precompute)."""

from __future__ import annotations

import atexit

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def process_state(device: str | None = None) -> PartialState:
    """accelerate's state of this process: alone, or one of several launched ones. As for an Accelerator,
    ACCELERATE_USE_CPU (`accelerate launch --cpu`, or the variable) or a CPU `device` makes the launched
    processes a gloo group on the CPU; plain `PartialState()` ignores the variable and would put each
    process on a GPU where there is one. The group is released when the process exits (`release_at_exit`)."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (device or "").startswith("cpu"))
    release_at_exit()
    return state


def _release() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, before it tears itself down.

    A launched process that returns without `destroy_process_group` leaves gloo's worker threads holding
    tensors; freeing them during interpreter finalisation aborts the process ("terminate called without
    an active exception", SIGABRT) about one exit in three on 2 CPU processes, and the launcher then
    reports the whole run as failed although every result was written. Local, not a collective: safe on
    a path where another process has already raised. Registering twice is harmless (atexit keeps one)."""
    atexit.unregister(_release)
    atexit.register(_release)
