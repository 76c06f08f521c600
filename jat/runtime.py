"""Process-level settings for fast CPU runs.

glibc's malloc hands every block above a dynamic threshold (128 KiB at start) to `mmap` and gives it
back to the kernel on free. A training step allocates and frees the same few hundred megabytes of
activations, gradients and autocast weight copies every time, so each step would fault all of those
pages in again: on the development machine that cost about 10 % of a V2 forward+backward and half
of a per-tensor AdamW step. Raising the thresholds keeps freed memory in the process for reuse; the
peak resident size does not grow, it is just not returned between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # an int: never trim the heap top between steps

_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks up to 32 MiB in the heap instead of unmapping them.

    Returns True when the setting is in force. A no-op (False) off Linux/glibc, or when the
    environment variable JAT_MALLOC_TUNING=0 opts out; idempotent.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("JAT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = (bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
              and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _tuned
