"""A command's place among `accelerate launch`'s processes (jat-train, jat-eval, jat-precompute)."""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from jat.runtime import release_at_exit


def process_state(device: str | None = None) -> PartialState:
    """accelerate's state of this process: alone, or one of several launched ones. As for an Accelerator,
    ACCELERATE_USE_CPU (`accelerate launch --cpu`, or the variable) or a CPU `device` makes the launched
    processes a gloo group on the CPU; plain `PartialState()` ignores the variable and would put each
    process on a GPU where there is one. The group is released when the process exits
    (`jat.runtime.release_at_exit`)."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (device or "").startswith("cpu"))
    release_at_exit()
    return state

