"""The CPU runtime settings: freed memory is kept for reuse, so a training step does not fault its
pages in again (measured with the kernel's minor-fault counter in fresh processes), and denormals
are flushed to zero; the trainer and the upsampler run with them."""

import functools
import json
import os
import subprocess
import sys

import pytest
from helpers import CHILD_ENV, ROOT, TESTS

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


USERS = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import ROOT, tiny_trainer
from jat.codecs import LatentNorm, MDCTCodec
from jat.codecs.latent import LatentSpace
from jat.config import Config
from jat.infer.upsampler import Upsampler
from jat.model.dit import JaT
from jat.model.flow import FlowMatching

def flushed():  # 1e-40 is a denormal: 0.0 once denormals flush to zero
    return float(torch.tensor([1e-30]) * torch.tensor([1e-10])) == 0.0

seen = {"fresh": flushed()}
trainer = tiny_trainer(sys.argv[2], steps=1)
trainer.fit()
seen["trained"] = flushed()
torch.set_flush_denormal(False)  # back to the default, then the upsampler
cfg = Config.from_yaml(ROOT / "configs" / "tiny.yaml")
Upsampler(JaT(cfg.model), LatentSpace(MDCTCodec(), LatentNorm.identity(512)), FlowMatching(cfg.flow), "cpu",
          precision="bf16")
seen["upsampler"] = flushed()
print(json.dumps(seen))
"""


def test_training_and_upsampling_on_cpu_run_with_the_tuned_runtime(tmp_path):
    """The trainer (once fit starts) and the upsampler (once built) put the CPU runtime settings in
    force in their process; observed by the denormal flush (the malloc setting has no getter: its
    effect is measured above)."""
    if not probe("1")["flush"]:
        pytest.skip("this CPU cannot flush denormals")
    env = {**CHILD_ENV, "JAT_CPU_TUNING": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-c", USERS, str(TESTS), str(tmp_path / "run")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"fresh": False, "trained": True, "upsampler": True}
