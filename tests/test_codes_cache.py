"""The DAC codes cache: shards of quantizer codes rebuild, on the device, exactly the latents that direct
encoding gives (tiny random DAC), and take a fraction of the bytes; bytes per hour from the real DAC's
configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_clips
from safetensors.torch import load_file

import jat.data.precompute as pre
from jat.codecs import LatentNorm
from jat.codecs.dac import DACCodec
from jat.codecs.latent import LatentSpace
from jat.config import DataConfig
from jat.data.datasets import LatentShardDataset, collate
from jat.train.data import TrainingData

CFG = DataConfig(segment_seconds=0.5)  # 22050 samples, 44 frames
T = 44


def test_encode_is_the_codes_rebuilt(tiny_dac):
    codec = DACCodec(tiny_dac)
    audio = 0.1 * torch.randn(3, 1, 5000, generator=torch.Generator().manual_seed(0))
    codes = codec.encode_codes(audio)  # [3, Q, T]
    assert codes.shape == (3, 2, 10) and 0 <= int(codes.min()) and int(codes.max()) < codec.codebook_size
    z = codec.encode(audio)
    assert torch.equal(codec.from_codes(codes), z)
    # any subset of rows or frames rebuilds the same bits: frames are independent (1x1 projections)
    assert torch.equal(codec.from_codes(codes[[2, 0], :, 3:7].to(torch.int16)), z[[2, 0], :, 3:7])
    # the library's forward pass adds the straight-through term z_e + (z_q - z_e): equal up to rounding
    # of values of this size (float32 eps 1.2e-7 x |z| ~ 2.5, a few roundings)
    ref = tiny_dac.encode(tiny_dac.preprocess(audio, 44100))[0]
    assert float((ref - z).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(z.abs().max())


def run(clips: list[Path], out: Path, codec, cache: str, dtype: str = "float16") -> dict:
    return pre.precompute(clips, out, codec, CFG, versions=2, shard_size=3, batch_size=4, cache=cache,
                          dtype=dtype, data_root=clips[0].parent)


@pytest.fixture(scope="module")
def caches(tiny_dac, tmp_path_factory: pytest.TempPathFactory):
    """The same clips pre-encoded three ways with the tiny DAC: codes, HR codes only, float32 latents."""
    root = tmp_path_factory.mktemp("codes")
    clips = write_clips(root / "clips")
    codec = DACCodec(tiny_dac)
    metas = {cache: run(clips, root / cache, codec, cache, "float32") for cache in ("codes", "codes-hr",
                                                                                    "latents")}
    return root, codec, metas


def rows(folder: Path) -> dict[str, torch.Tensor]:
    shards = [load_file(p) for p in sorted(folder.glob("shard-*.safetensors"))]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def test_codes_shards_rebuild_the_direct_latents(caches):
    root, codec, metas = caches
    codes, hr_only, latents = rows(root / "codes"), rows(root / "codes-hr"), rows(root / "latents")
    n = len(latents["frames"])
    assert n == 8 and set(codes) == {"hr_codes", "lr_codes", "frames", "cutoff", "moments_hr", "moments_lr"}
    assert codes["hr_codes"].shape == (n, 2, T) and codes["lr_codes"].shape == (n, 2, 2, T)
    assert codes["hr_codes"].dtype == torch.int16 and hr_only["lr"].dtype == torch.float32
    # the float32 latents are direct encodings of the same segments: rebuilding the codes gives them
    assert torch.equal(codec.from_codes(codes["hr_codes"]), latents["hr"])
    assert torch.equal(codec.from_codes(codes["lr_codes"].flatten(0, 1)), latents["lr"].flatten(0, 1))
    assert torch.equal(hr_only["lr"], latents["lr"]) and torch.equal(hr_only["hr_codes"], codes["hr_codes"])
    for k in ("frames", "cutoff", "moments_hr", "moments_lr"):  # the same values, so the same statistics
        assert torch.equal(codes[k], latents[k]) and torch.equal(hr_only[k], latents[k]), k
    for name in ("stats.safetensors", "stats_lr.safetensors"):
        assert (root / "codes" / name).read_bytes() == (root / "latents" / name).read_bytes()
    assert metas["codes"]["cache"] == "codes" and "cache" not in metas["latents"]


def test_training_batches_from_codes_equal_those_from_latents(caches):
    """The trainer's batch from a codes shard (codes -> latents on the device, normalised) equals the
    batch from the float32 latent shard of the same audio, crops and LR versions included."""
    root, codec, _ = caches
    norm = LatentNorm.load(root / "latents" / "stats.safetensors")
    space = LatentSpace(codec, norm)
    for cache in ("codes", "codes-hr"):
        from_codes, from_latents = (LatentShardDataset(root / c, segment_frames=16, seed=3)
                                    for c in (cache, "latents"))
        assert len(from_codes) == len(from_latents) == 8
        raw = collate([from_codes[i] for i in range(8)])
        assert raw["x_codes"].shape == (8, 2, 16) and ("c_codes" in raw) == (cache == "codes")
        got = TrainingData(from_codes, space).to_batch(raw, torch.device("cpu"), torch.float32)
        want = TrainingData(from_latents, space).to_batch(collate([from_latents[i] for i in range(8)]),
                                                         torch.device("cpu"), torch.float32)
        for a, b in ((got.x, want.x), (got.c, want.c), (got.mask, want.mask)):
            assert torch.equal(a, b), cache


def test_codes_take_a_fraction_of_the_bytes(caches, tmp_path: Path):
    root, codec, metas = caches
    half = run(sorted((root / "clips").iterdir()), tmp_path, codec, "latents", "float16")
    frames = int(rows(tmp_path)["frames"].sum())
    # per frame: HR + 2 LR rows of 2 int16 codes, or of 64 float16 channels
    for meta, folder, per_frame in ((metas["codes"], root / "codes", 3 * 2 * 2),
                                    (half, tmp_path, 3 * 64 * 2)):
        assert meta["hours"] == pytest.approx(frames * 512 / 44100 / 3600, rel=1e-12)
        assert meta["bytes"] == sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))
        assert meta["bytes"] > meta["rows"] * T * per_frame  # the rows, plus frames, cutoffs, moments, header
        assert meta["bytes_per_hour"] == round(meta["bytes"] / meta["hours"])
    assert metas["codes"]["bytes"] < half["bytes"] / 5
    # on paper, the real DAC 44 kHz: 9 codebooks of 1024 entries, 1024 channels, 86.13 frames/s, 4 LR versions
    rate = 44100 / 512
    assert pre.bytes_per_hour("latents", 4, 1024) == pytest.approx(5 * 1024 * 2 * rate * 3600)  # 3.18 GB/h
    assert pre.bytes_per_hour("codes", 4, 1024, 9) == pytest.approx(5 * 9 * 2 * rate * 3600)  # 27.9 MB/h
    assert pre.bytes_per_hour("codes-hr", 4, 1024, 9) == pytest.approx((9 * 2 + 4 * 2048) * rate * 3600)


def test_cache_choice(tiny_dac):
    from jat.codecs import MDCTCodec

    assert pre.resolve_cache("auto", DACCodec(tiny_dac)) == "codes"
    assert pre.resolve_cache("auto", MDCTCodec()) == "latents"
    with pytest.raises(ValueError, match="no quantizer codes"):
        pre.resolve_cache("codes", MDCTCodec())
    with pytest.raises(ValueError, match="cache must be one of"):
        pre.resolve_cache("int8", MDCTCodec())
