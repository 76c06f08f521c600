"""The CPU runtime settings: freed memory is kept for reuse, so a training step does not fault its
pages in again (measured with the kernel's minor-fault counter in fresh processes), and denormals
are flushed to zero."""

import functools
import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, resource, torch
from jat.runtime import tune_cpu_runtime
settings = tune_cpu_runtime()
tiny = float(torch.tensor([1e-30]) * torch.tensor([1e-10]))  # 1e-40: a denormal unless flushed
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.memset.argtypes, libc.free.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], [ctypes.c_void_p]
def step(n=24 * 2**20):  # one step's 24 MiB activation: allocated, written, freed
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    libc.free(p)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": settings["keep_freed_memory"], "faults": faults, "tiny": tiny,
                  "flush": settings["flush_denormal"], "again": tune_cpu_runtime() == settings}))
"""


@functools.cache
def probe(setting: str) -> dict:
    env = {**os.environ, "JAT_CPU_TUNING": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_freed_memory_is_reused_without_page_faults():
    default, tuned = probe("0"), probe("1")
    assert default["tuned"] is False and tuned["tuned"] is True
    pages = 24 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    assert default["faults"] > 0.5 * pages  # the freed block went back to the kernel: faulted in again
    assert tuned["faults"] < 0.05 * pages  # kept and reused


def test_denormals_are_flushed_only_when_tuned():
    default, tuned = probe("0"), probe("1")
    assert default["flush"] is False and 0 < default["tiny"] < 1e-38
    assert tuned["flush"] is True and tuned["tiny"] == 0.0
    assert default["again"] and tuned["again"]  # a second call reports the same settings
