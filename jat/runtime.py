"""Process-level settings for fast CPU runs: `tune_cpu_runtime()`, called by the trainer, the
upsampler and the benchmark once their model is final. JAT_CPU_TUNING=0 turns it off.

1. Freed memory stays in the process (`keep_freed_memory`). glibc's malloc hands every block above
a dynamic threshold (128 KiB at start) to `mmap` and gives it back to the kernel on free. A
training step allocates and frees the same few hundred megabytes of activations, gradients and
autocast weight copies every time, so each step would fault all of those pages in again: on the
development machine that cost about 10 % of a V2 forward+backward and half of a per-tensor AdamW
step. Raising the thresholds keeps freed memory in the process for reuse.

Call it once the model is built, quantized and cast: memory freed from then on stays with the
process, so setup garbage (an fp32 model quantized to NF4, say) would otherwise stay resident too.
`keep_freed_memory()` therefore first hands back what is free at that moment (`malloc_trim`).

2. Denormal floats are flushed to zero (`torch.set_flush_denormal`). Probabilities far down a
softmax tail and the GELU's sigmoid for strongly negative inputs fall below 1e-38, where x86 cores
take a slow path; flushed, V2's sampler ran about 5 % faster on the development machine.

3. A launched process releases its process group at exit (`release_at_exit`, called by the commands'
`process_state` and the trainer's Accelerator).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import sys

import torch
import torch.distributed as dist

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap top between steps

_tuned: bool | None = None


def _enabled() -> bool:
    return os.environ.get("JAT_CPU_TUNING", "1") != "0"


def tune_cpu_runtime() -> dict[str, bool]:
    """Keep freed memory and flush denormals (module docstring); returns which settings are in force."""
    return {"keep_freed_memory": keep_freed_memory(),
            "flush_denormal": _enabled() and torch.set_flush_denormal(True)}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


def keep_freed_memory() -> bool:
    """Hand back the memory free now, then tell glibc malloc to keep blocks up to 32 MiB that are
    freed later in the heap instead of unmapping them.

    Returns True when the setting is in force. A no-op (False) off Linux/glibc, or when the
    environment variable JAT_CPU_TUNING=0 opts out; the setting is made once per process.
    """
    global _tuned
    if not _enabled() or (libc := _libc()) is None:
        return False
    libc.malloc_trim(0)
    if _tuned is None:
        _tuned = (bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
                  and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _tuned


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
