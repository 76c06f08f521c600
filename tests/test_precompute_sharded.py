"""Pre-encoding over several processes (parts equal one process, bit for bit, statistics included), the
header cache, the shard index (readers open only the shards they read), shards read from fsspec URLs
and tars, and the run-long DataLoader with persistent workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import DDP_ENV, make_config, write_clips

import jat.data.datasets as datasets
import jat.data.precompute as pre
from jat.codecs import LatentNorm, MDCTCodec
from jat.codecs.latent import LatentSpace
from jat.config import DataConfig
from jat.data.datasets import LatentShardDataset
from jat.data.shards import ShardError, ShardSource
from jat.train.data import StepBatches, TrainingData, prepare

CFG = DataConfig(segment_seconds=0.5)


def run(clips: Path, out: Path, part=(0, 1)) -> dict | None:
    return pre.precompute(sorted(clips.iterdir()), out, MDCTCodec(), CFG, versions=2, shard_size=3,
                          batch_size=4, data_root=clips, part=part)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """8 rows (3 + 2 x 2 + 1) in shards of 3, 3 and 2, from one process."""
    root = tmp_path_factory.mktemp("sharded")
    write_clips(root / "clips")
    return root / "clips", root / "one", run(root / "clips", root / "one")


def test_parts_equal_one_process(reference, tmp_path: Path, monkeypatch):
    clips, one, meta = reference
    assert list(meta["shards"].values()) == [3, 3, 2]
    want = files(one)
    assert set(want) == {*(f"shard-0000{j}.safetensors" for j in range(3)), "stats.safetensors",
                         "stats_lr.safetensors", "meta.json", "index.json", "headers.json"}
    for count in (2, 3):
        out = tmp_path / f"parts-{count}"
        assert run(clips, out, (1, count)) is None  # a part writes its own shards, and nothing merged
        assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{j}.safetensors"
                                                               for j in range(1, 3, count)]
        assert not (out / "index.json").exists() and not (out / "stats.safetensors").exists()
        for i in (0, *range(2, count)):
            run(clips, out, (i, count))
        with monkeypatch.context() as patch:
            patch.setattr(pre, "encode_shard", lambda *a, **k: pytest.fail("a done shard encoded again"))
            assert run(clips, out) == meta  # the merge: every shard is done, none is encoded again
        got = files(out)
        assert got.keys() == want.keys()
        for name in want:  # shards, statistics (merged in shard order), meta, index: the same bytes
            assert got[name] == want[name], (count, name)
    with pytest.raises(ValueError, match="0 <= index < count"):
        run(clips, tmp_path, (2, 2))


def test_header_cache_spares_the_scan(reference, monkeypatch):
    clips, one, _ = reference
    paths = sorted(clips.iterdir())
    plan, _, _ = pre.plan_shards(paths, CFG, 44100, 3, clips)

    def no_header(path):
        raise AssertionError(f"read the header of {path}")

    with monkeypatch.context() as patch:
        patch.setattr(datasets, "audio_info", no_header)
        assert pre.plan_shards(paths, CFG, 44100, 3, clips, headers=one / pre.HEADERS)[0] == plan
        # a file changed since the cache was written is read again
        changed = clips / "clip-2.wav"
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="clip-2.wav"):
            pre.plan_shards(paths, CFG, 44100, 3, clips, headers=one / pre.HEADERS)


def items(ds: LatentShardDataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
                                            for k in x) for x, y in zip(a, b, strict=True))


def test_index_opens_only_the_shards_read(reference, monkeypatch, tmp_path: Path):
    _, one, _ = reference
    opened = []
    real = ShardSource.open
    monkeypatch.setattr(ShardSource, "open", lambda self, name: opened.append(name) or real(self, name))
    ds = LatentShardDataset(one, segment_frames=16, seed=2)
    assert opened == [] and len(ds) == 8 and (ds.versions, ds.latent_dim, ds.frames) == (2, 512, 44)
    ds[4]  # row 1 of shard 1
    assert opened == ["shard-00001.safetensors"]
    ds[5]
    assert opened == ["shard-00001.safetensors"]
    # the same folder without its index (as written before the index existed): every header at start
    old = tmp_path / "old"
    old.mkdir()
    for name, data in files(one).items():
        if name != "index.json":
            (old / name).write_bytes(data)
    opened.clear()
    legacy = LatentShardDataset(old, segment_frames=16, seed=2)
    assert opened == [f"shard-0000{j}.safetensors" for j in range(3)]
    assert same(items(legacy), items(LatentShardDataset(one, segment_frames=16, seed=2)))


def test_index_that_disagrees_names_the_shard(reference, tmp_path: Path):
    _, one, _ = reference
    for name, data in files(one).items():
        (tmp_path / name).write_bytes(data)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][2]["rows"] = 3
    (tmp_path / "index.json").write_text(json.dumps(index))
    ds = LatentShardDataset(tmp_path)
    ds[0]
    with pytest.raises(ShardError, match="shard-00002.safetensors.*index.json"):
        ds[6]


def test_shards_stream_from_a_url_and_a_tar(reference, tmp_path: Path):
    pytest.importorskip("fsspec")
    _, one, _ = reference
    want = items(LatentShardDataset(one, segment_frames=16, seed=1))
    archive = tmp_path / "latents.tar"
    with tarfile.open(archive, "w") as tar:  # as `tar -cf latents.tar -C latents .` makes it
        for p in sorted(one.iterdir()):
            tar.add(p, arcname=f"./{p.name}")
    for root in (f"file://{one}", str(archive), f"file://{archive}"):
        ds = LatentShardDataset(root, segment_frames=16, seed=1)
        assert same(items(ds), want), root
        assert ds.meta == json.loads((one / "meta.json").read_text())
    with pytest.raises(ShardError, match="not found"):
        LatentShardDataset(f"file://{tmp_path}/missing")
    # training reads the statistics from wherever the shards are
    want_norm = LatentNorm.load(one / "stats.safetensors")
    for root in (f"file://{one}", f"file://{archive}"):
        norm = ShardSource(root).latent_norm()
        assert torch.equal(norm.mean, want_norm.mean) and torch.equal(norm.std, want_norm.std)
    cfg = make_config(str(tmp_path / "run"), 2, 1, **{"data.latents": str(archive)})
    data = prepare(cfg)
    assert len(data.dataset) == 8 and torch.equal(data.latents.norm.mean, want_norm.mean)


def test_one_loader_with_persistent_workers_equals_no_workers(reference):
    """Across an epoch boundary, 2 persistent prefetching workers give the batches the main process
    gives: the epoch travels with each index, so the workers' copies need no set_epoch."""
    _, one, _ = reference
    ds = LatentShardDataset(one, segment_frames=16, seed=0)
    space = LatentSpace.identity(MDCTCodec(), 512)
    sampler = StepBatches(len(ds), 2, 0, 1, seed=0)  # 4 batches per epoch
    runs = []
    for workers in (0, 2):
        data = TrainingData(ds, space, num_workers=workers, persistent_workers=True, pin_memory=True)
        it = data.batches(sampler, micro_start=2)
        runs.append([next(it) for _ in range(7)])  # epochs 0 (from batch 2), 1 and 2
        it.close()
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["c"], b["c"]) and torch.equal(a["cutoff"],
                                                                                             b["cutoff"])
    # and they are that epoch's items: epoch 1, batch 0 is the second run's third batch
    ds.set_epoch(1)
    first = next(sampler.epoch_batches(1))
    assert torch.equal(runs[1][2]["x"], torch.stack([ds[i]["x"] for i in first]))


@pytest.mark.slow
def test_accelerate_launch_over_two_processes_equals_one(reference, tmp_path: Path):
    clips, _, _ = reference
    config = tmp_path / "cfg.yaml"
    config.write_text("codec: {name: mdct}\nmodel: {preset: tiny, in_channels: 512}\n"
                      "data: {segment_seconds: 0.5, versions: 2}\n")
    script = Path(__file__).resolve().parent.parent / "scripts" / "precompute_latents.py"
    args = ["--config", str(config), "--data", str(clips), "--shard-size", "3", "--device", "cpu"]
    one = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "one")],
                         env=DDP_ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29571"]
    two = subprocess.run([*launch, str(script), *args, "--out", str(tmp_path / "two")],
                         env=DDP_ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "MB per hour" in two.stdout and two.stdout.count("wrote 3 shards") == 1
    # each process encoded its part: shards 0 and 2 (3 + 2 segments), shard 1 (3)
    assert "part 0 of 2: 5 segments done" in two.stdout and "part 1 of 2: 3 segments done" in two.stdout
    want, got = files(tmp_path / "one"), files(tmp_path / "two")
    assert got.keys() == want.keys() and all(got[n] == want[n] for n in want)
    norm = LatentNorm.load(tmp_path / "two" / "stats.safetensors")
    assert norm.channels == 512
