"""Tests of jat.data.datasets and jat.data.precompute: audio segments, bad files, latent shards,
resumable precompute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import jat.data.precompute as pre
from jat.codecs import SAMPLE_RATE, LatentNorm, MDCTCodec
from jat.config import DataConfig
from jat.data.audio import AudioError, load_audio
from jat.data.datasets import (
    AudioSegmentDataset,
    LatentShardDataset,
    ShardError,
    at_reference_level,
    collate,
    read_crop,
    shard_metadata,
)

SR = SAMPLE_RATE
CFG = DataConfig(segment_seconds=1.0)  # raw-audio tests: 44100-sample segments
PRE_CFG = DataConfig(segment_seconds=0.5)  # precompute tests: 22050 samples, 44 latent frames
T_SEG = 44


def write_clip(path: Path, seconds: float, sr: int, channels: int, seed: int,
               subtype: str | None = None) -> Path:
    """Tones plus broadband noise (so a low-pass visibly removes something), distinct per channel."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    data = np.stack([0.3 * np.sin(2 * np.pi * (150 * (c + 1) + seed) * t) + 0.05 * rng.standard_normal(n)
                     for c in range(channels)], axis=1)  # [L, channels]
    sf.write(path, data.astype(np.float32), sr, subtype=subtype)
    return path


def write_bad(folder: Path) -> dict[str, Path]:
    """The four kinds of bad file: random bytes, 0 bytes, all zeros, a NaN sample."""
    paths = {k: folder / f"bad_{k}.wav" for k in ("random", "empty", "silent", "nan")}
    paths["random"].write_bytes(np.random.default_rng(0).bytes(4000))
    paths["empty"].write_bytes(b"")
    sf.write(paths["silent"], np.zeros(8000, np.float32), 16000)
    nan = np.full(4000, 0.1, np.float32)
    nan[100] = np.nan
    sf.write(paths["nan"], nan, SR, subtype="FLOAT")
    return paths


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    d = tmp_path / "audio"
    (d / "sub").mkdir(parents=True)
    write_clip(d / "a_8k_mono.wav", 2.5, 8000, 1, seed=1)  # 2 items of 1 s
    write_clip(d / "sub" / "b_22k_stereo.flac", 3.3, 22050, 2, seed=2)  # 3 items
    write_clip(d / "c_48k_short.wav", 0.4, 48000, 1, seed=3)  # 1 padded item
    write_clip(d / "d_44k_stereo.wav", 2.2, SR, 2, seed=4, subtype="FLOAT")  # 2 items
    return d


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------------------------
# AudioSegmentDataset


def test_segments_have_fixed_length_and_masks(audio_dir: Path):
    ds = AudioSegmentDataset(audio_dir, CFG)
    assert len(ds) == 8 and ds.skipped == {}
    for i in range(len(ds)):
        item = ds[i]
        assert item["hr"].shape == item["lr"].shape == (1, SR) and item["mask"].shape == (SR,)
        assert item["mask"].dtype == torch.bool and item["hr"].dtype == torch.float32
        assert CFG.cutoff_min <= item["cutoff"] <= CFG.cutoff_max
        assert not item["hr"][0, ~item["mask"]].any() and not item["lr"][0, ~item["mask"]].any()
        assert not torch.equal(item["hr"], item["lr"])
    # a short file is read whole, resampled like load_audio, and right-padded
    item = AudioSegmentDataset([audio_dir / "c_48k_short.wav"], CFG)[0]
    n = int(0.4 * SR)
    assert item["mask"][:n].all() and not item["mask"][n:].any()
    whole = load_audio(audio_dir / "c_48k_short.wav")[0]  # [n]
    torch.testing.assert_close(item["hr"][0, :n], torch.from_numpy(at_reference_level(whole.numpy())),
                               atol=1e-6, rtol=0)
    # the LR has lost the band above its cutoff; the HR has not
    spec_hr = np.abs(np.fft.rfft(item["hr"][0, :n].numpy())) ** 2
    spec_lr = np.abs(np.fft.rfft(item["lr"][0, :n].numpy())) ** 2
    high = np.fft.rfftfreq(n, 1 / SR) > item["cutoff"] * 1.05
    assert spec_lr[high].sum() < 1e-4 * spec_hr[high].sum()


def test_crops_are_slices_of_one_channel(audio_dir: Path, tmp_path: Path):
    path = audio_dir / "d_44k_stereo.wav"
    data = sf.read(path, dtype="float32")[0]  # [L, 2]
    ds = AudioSegmentDataset([path], CFG)
    # dataset examples are crops brought to the reference level; read_crop's are the raw slices
    crops = [(ds[i]["hr"][0].numpy(), at_reference_level) for i in range(len(ds))]
    crops += [(read_crop(ds.infos[0], SR, SR, np.random.default_rng(k)), lambda x: x) for k in range(20)]
    channels, starts = set(), set()
    for hr, level in crops:
        hits = []
        for ch in range(2):
            with np.errstate(divide="ignore", invalid="ignore"):  # candidate starts: the same gain twice
                r0, r1 = hr[0] / data[:-1, ch], hr[1] / data[1:, ch]
            for s in np.flatnonzero(np.isclose(r0, r1, rtol=1e-5)):
                if s + SR <= len(data) and np.array_equal(level(data[s : s + SR, ch]), hr):
                    hits.append((ch, s))
        assert hits, "crop is not a slice of a channel"
        channels.add(hits[0][0])
        starts.add(hits[0][1])
    assert channels == {0, 1} and len(starts) > 10
    # resampled files: the windowed read matches the whole file resampled, at some offset
    for sr in (8000, 48000):
        long = write_clip(tmp_path / f"long_{sr}.wav", 3.0, sr, 1, seed=sr)
        full = load_audio(long)[0].numpy()  # [L]
        hr = AudioSegmentDataset([long], CFG, seed=5)[1]["hr"][0].numpy()
        start = int(np.argmax(scipy.signal.correlate(full, hr, mode="valid", method="fft")))
        np.testing.assert_allclose(hr, at_reference_level(full[start : start + SR]), atol=1e-5)


def test_examples_depend_only_on_seed_epoch_index(audio_dir: Path):
    ds, resumed = AudioSegmentDataset(audio_dir, CFG, seed=3), AudioSegmentDataset(audio_dir, CFG, seed=3)
    ds.set_epoch(2)
    resumed.set_epoch(2)
    picks = [6, 0]
    first = {i: ds[i] for i in picks}
    for i in reversed(picks):  # another instance, another order: the same examples
        assert same(first[i], resumed[i])
    ds.set_epoch(3)
    assert all(not same(first[i], ds[i]) for i in picks)
    other_seed = AudioSegmentDataset(audio_dir, CFG, seed=4)
    other_seed.set_epoch(2)
    assert not same(first[0], other_seed[0])
    val = AudioSegmentDataset(audio_dir, CFG, seed=3, train=False)
    a = val[1]
    val.set_epoch(7)
    assert same(a, val[1])  # validation examples do not change with the epoch


def test_bad_files_are_skipped_and_listed(audio_dir: Path, caplog: pytest.LogCaptureFixture):
    bad = write_bad(audio_dir)
    ds = AudioSegmentDataset(audio_dir, CFG)
    # the header scan finds the unreadable and the empty file up front
    assert set(ds.skipped) == {str(bad["random"]), str(bad["empty"])}
    assert "not a readable audio file" in ds.skipped[str(bad["random"])]
    assert "empty" in ds.skipped[str(bad["empty"])]
    assert len(ds) == 8 + 2  # silent and NaN files pass the header scan
    for i in range(len(ds)):
        hr = ds[i]["hr"]
        assert torch.isfinite(hr).all() and hr.abs().max() > 0
    assert set(ds.skipped) == {str(p) for p in bad.values()}
    assert "silent" in ds.skipped[str(bad["silent"])]
    assert "NaN" in ds.skipped[str(bad["nan"])]
    for path in bad.values():
        assert any(str(path) in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_strict_mode_raises_naming_the_file(audio_dir: Path, tmp_path: Path):
    bad = write_bad(tmp_path)
    strict = DataConfig(segment_seconds=1.0, strict=True)
    with pytest.raises(AudioError, match="bad_random.wav"):
        AudioSegmentDataset([audio_dir / "a_8k_mono.wav", bad["random"]], strict)
    ds = AudioSegmentDataset([bad["silent"]], strict)  # the header is fine
    with pytest.raises(AudioError, match="bad_silent.wav.*silent"):
        ds[0]
    with pytest.raises(AudioError, match="bad_nan.wav"):
        pre.precompute([audio_dir / "c_48k_short.wav", bad["nan"]], tmp_path / "lat", MDCTCodec(),
                       DataConfig(segment_seconds=0.5, strict=True), versions=1)


# ---------------------------------------------------------------------------------------------
# precompute


def run_precompute(clips: Path, out: Path, seed: int = 0, workers: int = 0) -> dict:
    return pre.precompute(sorted(clips.iterdir()), out, MDCTCodec(), PRE_CFG, versions=2, shard_size=3,
                          seed=seed, batch_size=4, workers=workers, data_root=clips)


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Clips -> 9 planned units (3 + 2x2 + NaN + 1) in 3 shards; the NaN file is skipped: 8 rows."""
    clips = tmp_path_factory.mktemp("clips")
    write_clip(clips / "a_8k.wav", 1.2, 8000, 1, seed=1)  # 2 full segments + a 0.2 s tail
    write_clip(clips / "b_22k.flac", 0.7, 22050, 2, seed=2)  # 1 + tail, per channel
    write_clip(clips / "c_48k.wav", 0.4, 48000, 1, seed=3)  # one padded segment
    bad = write_bad(clips)
    bad["silent"].unlink()
    bad["empty"].unlink()
    out = tmp_path_factory.mktemp("latents")
    return clips, out, run_precompute(clips, out)


def read_rows(out: Path) -> tuple[dict[str, torch.Tensor], list]:
    shards = [load_file(p) for p in sorted(out.glob("shard-*.safetensors"))]
    rows = {k: torch.cat([s[k] for s in shards]) for k in ("hr", "lr", "frames", "cutoff")}
    sources = []
    for p in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            sources += shard_metadata(f)["sources"]
    return rows, sources


def test_precompute_writes_shards_and_stats(latents):
    clips, out, meta = latents
    assert [p.name for p in sorted(out.glob("shard-*"))] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["rows"] == 8 and meta["files"] == 3 and meta["shards"]["shard-00002.safetensors"] == 2
    assert set(meta["skipped"]) == {str(clips / "bad_nan.wav"), str(clips / "bad_random.wav")}
    rows, sources = read_rows(out)
    assert rows["hr"].shape == (8, 512, T_SEG) and rows["lr"].shape == (8, 2, 512, T_SEG)
    assert rows["hr"].dtype == rows["lr"].dtype == torch.float16 and rows["cutoff"].shape == (8, 2)
    frames = dict(zip(map(tuple, sources), rows["frames"].tolist(), strict=True))
    assert frames[("a_8k.wav", 0, 0)] == T_SEG and frames[("a_8k.wav", 0, 2)] == -(-int(0.2 * SR) // 512)
    assert frames[("c_48k.wav", 0, 0)] == -(-int(0.4 * SR) // 512)
    assert ("b_22k.flac", 1, 1) in frames
    # the HR latent is the codec's encoding of that segment
    codec = MDCTCodec()
    for r, (key, ch, seg) in enumerate(sources):
        audio = torch.zeros(1, 1, 22050)
        piece = load_audio(clips / key)[ch, seg * 22050 : (seg + 1) * 22050]
        audio[0, 0, : len(piece)] = torch.from_numpy(at_reference_level(piece.numpy()))
        torch.testing.assert_close(rows["hr"][r].float(), codec.encode(audio)[0], rtol=2e-3, atol=2e-3)
    # K versions differ, and each has lost the band above its cutoff
    r = sources.index(["c_48k.wav", 0, 0])
    lr, hr, cut = rows["lr"][r].float(), rows["hr"][r].float(), rows["cutoff"][r]
    assert cut[0] != cut[1] and (lr[0] - lr[1]).abs().mean() > 0.05 * lr.abs().mean()
    bin_hz = (torch.arange(512) + 0.5) * SR / 1024
    for k in range(2):
        high = bin_hz > cut[k] + 1000
        assert lr[k][high].abs().mean() < 0.2 * hr[high].abs().mean()
    # stats equal mean/std recomputed from the stored latents over valid frames
    valid = torch.arange(T_SEG)[None] < rows["frames"][:, None]  # [N, T]
    for name, z, mask in (("stats", rows["hr"][:, None], valid), ("stats_lr", rows["lr"], valid)):
        vals = z.double().permute(0, 1, 3, 2)[mask[:, None].expand(-1, z.shape[1], -1)]  # [M, C]
        norm = LatentNorm.load(out / f"{name}.safetensors")
        std = vals.std(0).clamp_min(1e-5 * vals.std(0).max())
        torch.testing.assert_close(norm.mean.double(), vals.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.std.double(), std, rtol=1e-4, atol=1e-5)


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    """Each shard's file identity (inode, mtime): a shard written again (atomically) gets a new one."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*"))}


def test_interrupted_precompute_redoes_only_unfinished_shards(latents, tmp_path: Path, monkeypatch):
    clips, reference, _ = latents
    out = tmp_path / "lat"
    real, encoded = pre.encode_shard, []

    def killed_in_second(units, *args, **kwargs):
        encoded.append(units)
        if len(encoded) == 2:
            raise KeyboardInterrupt  # as if the run were killed while encoding the second shard
        return real(units, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pre, "encode_shard", killed_in_second)
        with pytest.raises(KeyboardInterrupt):
            run_precompute(clips, out)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]
    first = shard_files(out)

    run_precompute(clips, out)
    done = shard_files(out)
    assert done["shard-00000.safetensors"] == first["shard-00000.safetensors"]  # kept, not redone
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:  # the same seed gives byte-identical shards, stats and meta
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name

    # a finished folder is left alone; a damaged shard is found and redone, and only it
    run_precompute(clips, out)
    assert shard_files(out) == done
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    damaged = shard_files(out)
    run_precompute(clips, out)
    again = shard_files(out)
    assert [n for n in again if again[n] != damaged[n]] == [shard.name]
    assert shard.read_bytes() == (reference / shard.name).read_bytes()
    # another seed is other work: every shard is redone, with other degradations
    run_precompute(clips, out, seed=1)
    assert all(v != again[n] for n, v in shard_files(out).items()) and len(again) == 3
    assert not torch.equal(load_file(shard)["cutoff"], load_file(reference / shard.name)["cutoff"])


@pytest.mark.slow
def test_precompute_in_worker_processes_gives_the_same_files(latents, tmp_path: Path):
    clips, reference, _ = latents
    run_precompute(clips, tmp_path, workers=2)
    for path in sorted(reference.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


# ---------------------------------------------------------------------------------------------
# LatentShardDataset


def test_latent_dataset_items(latents):
    _, out, _ = latents
    rows, _ = read_rows(out)
    ds = LatentShardDataset(out)
    assert len(ds) == 8 and (ds.versions, ds.latent_dim, ds.frames) == (2, 512, T_SEG)
    for i in range(len(ds)):  # items are the rows in shard order
        item = ds[i]
        assert item["x"].shape == item["c"].shape == (512, T_SEG) and item["x"].dtype == torch.float32
        assert torch.equal(item["x"], rows["hr"][i].float())
        assert int(item["mask"].sum()) == rows["frames"][i] and item["mask"][: rows["frames"][i]].all()
        k = [j for j in range(2) if torch.equal(item["c"], rows["lr"][i, j].float())]
        assert len(k) == 1 and item["cutoff"] == pytest.approx(float(rows["cutoff"][i, k[0]]))
    chosen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        chosen.add(ds[0]["cutoff"])
        assert torch.equal(ds[0]["x"], rows["hr"][0].float())
    assert len(chosen) == 2  # both LR versions are seen across epochs
    resumed = LatentShardDataset(out)
    resumed.set_epoch(11)
    assert same(ds[3], resumed[3])

    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["x"].shape == (4, 512, T_SEG) and batch["mask"].shape == (4, T_SEG)
    assert batch["cutoff"].shape == (4,) and batch["cutoff"].dtype == torch.float32


def test_latent_dataset_crops_and_pads(latents):
    _, out, _ = latents
    rows, _ = read_rows(out)
    crop = LatentShardDataset(out, segment_frames=16, seed=1)
    for epoch in range(3):
        crop.set_epoch(epoch)
        for i in range(len(crop)):
            item = crop[i]
            valid = int(rows["frames"][i])
            assert item["x"].shape == item["c"].shape == (512, 16)
            starts = [s for s in range(T_SEG - 15)
                      if torch.equal(item["x"], rows["hr"][i, :, s : s + 16].float())]
            assert starts and starts[0] <= max(0, valid - 16)  # the crop stays inside the valid frames
            assert int(item["mask"].sum()) == min(16, valid)
    pad = LatentShardDataset(out, segment_frames=64)[0]
    assert pad["x"].shape == (512, 64) and not pad["x"][:, T_SEG:].any()
    assert int(pad["mask"].sum()) == rows["frames"][0]


def test_latent_dataset_errors_name_the_file(latents, tmp_path: Path):
    _, out, _ = latents
    with pytest.raises(ShardError, match="no latent shards"):
        LatentShardDataset(tmp_path)
    with pytest.raises(ShardError, match="not found"):
        LatentShardDataset(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-00000.safetensors").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ShardError, match="shard-00000.safetensors"):
        LatentShardDataset(bad)
    shutil.copy(out / "shard-00000.safetensors", bad / "shard-00000.safetensors")
    truncated = (out / "shard-00001.safetensors").read_bytes()
    (bad / "shard-00001.safetensors").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(ShardError, match="shard-00001.safetensors"):
        LatentShardDataset(bad)
    save_file({"hr": torch.zeros(1, 4, 3)}, str(bad / "shard-00001.safetensors"))
    with pytest.raises(ShardError, match="shard-00001.safetensors.*missing"):
        LatentShardDataset(bad)


# ---------------------------------------------------------------------------------------------
# the script


def test_precompute_script(tmp_path: Path, capsys: pytest.CaptureFixture):
    from jat.cli import precompute_latents as script
    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "clip.wav", 0.4, 48000, 1, seed=0)
    bad = write_bad(data)
    config = tmp_path / "cfg.yaml"
    config.write_text("codec: {name: mdct}\nmodel: {preset: tiny, in_channels: 512}\n"
                      "data: {segment_seconds: 0.5, versions: 2}\n")
    args = ["--config", str(config), "--data", str(data), "--out", str(tmp_path / "lat"), "--device", "cpu"]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    for path in bad.values():
        assert str(path) in printed
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert meta["rows"] == 1 and meta["versions"] == 2 and meta["codec"]["name"] == "mdct"
    assert LatentShardDataset(tmp_path / "lat")[0]["x"].shape == (512, T_SEG)
    assert script.main(args + ["data.strict=true"]) == 1
    assert "bad_" in capsys.readouterr().err


def test_training_segments_are_at_the_upsamplers_reference_level(audio_dir: Path):
    """The upsampler brings every input to REF_RMS_DBFS (`level_gain`); training pairs are brought
    there too, whatever the file's own level, so the model learns at the level it is used at."""
    from jat.data.audio import PEAK_MAX, REF_RMS_DBFS

    target = 10 ** (REF_RMS_DBFS / 20)
    ds = AudioSegmentDataset(audio_dir, CFG)
    for i in range(len(ds)):
        item = ds[i]
        hr, lr = item["hr"][0, item["mask"]].double(), item["lr"][0, item["mask"]].double()
        rms, peak = float(hr.square().mean().sqrt()), float(hr.abs().max())
        assert rms == pytest.approx(target, rel=1e-4) or peak == pytest.approx(PEAK_MAX, rel=1e-4)
        assert float(lr.square().mean().sqrt()) <= 1.001 * rms  # the LR is the same pair, band-limited
    quiet = 1e-3 * ds[0]["hr"]  # a quiet file gives the same example as a loud one
    torch.testing.assert_close(torch.from_numpy(at_reference_level(quiet[0].numpy())), ds[0]["hr"][0],
                               rtol=1e-5, atol=1e-7)
    assert not at_reference_level(np.zeros(100, np.float32)).any()  # silence stays silence
