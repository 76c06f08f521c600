"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_dac():
    """A tiny randomly initialised DAC built from the real descript-audio-codec classes (hop 512)."""
    import dac

    torch.manual_seed(0)
    return dac.DAC(encoder_dim=4, encoder_rates=[2, 4, 8, 8], decoder_dim=32, decoder_rates=[8, 8, 4, 2],
                   n_codebooks=2, codebook_size=16, codebook_dim=4)


@pytest.fixture(autouse=True)
def _default_float_environment():
    """Each test starts with denormals kept: `jat.runtime.tune_cpu_runtime` (run by every trainer and
    upsampler) flushes them for the whole process, which would change later tests' arithmetic and
    trips hypothesis's float strategies, making results depend on test order."""
    yield
    torch.set_flush_denormal(False)
