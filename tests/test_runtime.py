"""The allocator setting: freed memory is kept for reuse, so a training step does not fault its
pages in again (measured with the kernel's minor-fault counter in fresh processes)."""

import json
import os
import subprocess
import sys

import pytest

from jat.runtime import keep_freed_memory

PROBE = r"""
import json, resource, torch
from jat.runtime import keep_freed_memory
tuned = keep_freed_memory()
def step():  # a step's worth of activations: 8 tensors of 12 MiB, written, then all freed
    ts = [torch.empty(3 * 2**20) for _ in range(8)]
    for t in ts:
        t.numpy().fill(1.0)  # numpy writes the pages (no torch thread-pool side effects)
    del ts
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"tuned": tuned, "faults_per_step": faults}))
"""


def probe(setting: str) -> dict:
    env = {**os.environ, "JAT_MALLOC_TUNING": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_freed_memory_is_reused_without_page_faults():
    default, tuned = probe("0"), probe("1")
    assert default["tuned"] is False and tuned["tuned"] is True
    pages = 8 * 12 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    assert default["faults_per_step"] > 0.5 * pages  # freed memory went back to the kernel: faults again
    assert tuned["faults_per_step"] < 0.2 * pages  # kept and reused


def test_keep_freed_memory_is_idempotent():
    assert keep_freed_memory() == keep_freed_memory()
