"""jat.data.corpus: the bandwidth measure and the whole build over fake extracted packages
(no apt, no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from jat.codecs.base import SAMPLE_RATE
from jat.data import corpus
from jat.data.audio import list_audio_files
from jat.data.corpus import (
    CorpusError,
    Criteria,
    Extracted,
    FileResult,
    Package,
    apply_cap,
    build_corpus,
    category_quotas,
    fetch_package,
    licence_summary,
    measure_bandwidth,
    select_packages,
)

SR = SAMPLE_RATE


def noise(seconds: float, sr: int = SR, channels: int = 1, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    """White noise [L, C] (soundfile's layout)."""
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((round(seconds * sr), channels))).clip(-1, 1)


def lowpass(x: np.ndarray, cutoff: float, sr: int = SR, order: int = 48) -> np.ndarray:
    sos = scipy.signal.butter(order, cutoff, fs=sr, output="sos")
    return scipy.signal.sosfiltfilt(sos, x, axis=0)


def harmonics(top: float, seconds: float = 4.0, f0: float = 140.0, sr: int = SR) -> np.ndarray:
    """A voiced, speech-like tone [L]: harmonics of f0 (1 % vibrato) up to `top` Hz, amplitudes 1/k."""
    t = np.arange(round(seconds * sr)) / sr
    phase = 2 * np.pi * f0 * (t - 0.01 / (2 * np.pi * 5) * np.cos(2 * np.pi * 5 * t))
    return 0.05 * sum(np.sin(k * phase) / k for k in range(1, int(top / f0) + 1))


# ---------------------------------------------------------------------------------------------------
# measure_bandwidth


def test_white_noise_is_full_band():
    x = noise(8.0)[:, 0]
    assert measure_bandwidth(x, SR) == pytest.approx(SR / 2, abs=200)
    assert measure_bandwidth(noise(4.0, sr=48000)[:, 0], 48000) == pytest.approx(24000, abs=200)


def test_steep_lowpass_reads_its_corner():
    x = lowpass(noise(8.0)[:, 0], 8000.0)
    assert measure_bandwidth(x, SR) == pytest.approx(8000.0, abs=1000)
    assert measure_bandwidth(lowpass(noise(8.0)[:, 0], 16000.0), SR) == pytest.approx(16000.0, abs=1000)


def test_speech_like_harmonics():
    rng = np.random.default_rng(1)
    for top in (7000.0, 11000.0):
        voiced = harmonics(top)
        # a clean recording ends with its highest harmonic ...
        assert measure_bandwidth(voiced + 1e-7 * rng.standard_normal(voiced.size), SR) == pytest.approx(
            top, abs=400)
        # ... breath and room noise within 70 dB of the voice make it full band
        assert measure_bandwidth(voiced + 3e-4 * rng.standard_normal(voiced.size), SR) > 21000


def test_channels_are_mixed_and_only_the_start_is_read():
    wide, narrow = noise(2.0, seed=2)[:, 0], lowpass(noise(2.0, seed=3)[:, 0], 8000.0)
    stereo = np.stack([narrow, narrow])  # [C, L]
    assert measure_bandwidth(stereo, SR) == pytest.approx(8000.0, abs=1000)
    joined = np.concatenate([narrow, wide])
    assert measure_bandwidth(joined, SR, max_seconds=2.0) == pytest.approx(8000.0, abs=1000)
    assert measure_bandwidth(joined, SR) > 21000
    assert measure_bandwidth(noise(0.05)[:, 0], SR) > 20000  # shorter than one 4096-sample segment


# ---------------------------------------------------------------------------------------------------
# the cap, licences, the table


def test_category_quotas_leave_unused_share_to_the_others():
    quotas = category_quotas({"speech": 12.7, "music": 92.0, "effects": 1.4}, 30.0)
    assert quotas == pytest.approx({"speech": 12.7, "music": 15.9, "effects": 1.4})
    assert category_quotas({"music": 164.0}, 30.0) == {"music": 30.0}
    assert category_quotas({"speech": 3.0, "music": 4.0}, 30.0) == {"speech": 3.0, "music": 4.0}


def test_apply_cap_takes_files_in_sorted_order_while_they_fit():
    files = [FileResult(f"m{i}.wav", "music", "kept", seconds=s) for i, s in enumerate([3.0, 3.0, 1.0])]
    files.append(FileResult("bad.wav", "music", "silent", seconds=9.0))
    capped = apply_cap(list(reversed(files)), 5.0 / 60)
    assert [(f.path, f.status) for f in capped] == [
        ("bad.wav", "silent"), ("m0.wav", "kept"), ("m1.wav", "over_cap"), ("m2.wav", "kept")]
    assert files[1].status == "kept"  # the input is left alone


def test_licence_summary():
    dep5 = ("Format: x\n\nFiles: *\nLicense: GPL-2+\n\nFiles: a\nLicense: CC-BY-SA-3.0\n\n"
            "License: GPL-2+\n text\n")
    assert licence_summary(dep5) == "GPL-2+, CC-BY-SA-3.0"
    prose = "Tux is licensed under the GNU General Public License version 2.\nSome files are public domain."
    assert licence_summary(prose) == "GPL, public domain (prose, not machine-readable)"
    assert licence_summary("no words about it") == "unknown"
    cc = "PROVIDED UNDER THE TERMS OF THIS CREATIVE COMMONS PUBLIC LICENSE ... Attribution, ShareAlike."
    assert licence_summary(cc) == "CC-BY-SA (prose, not machine-readable)"


def test_table_is_consistent():
    names = [p.name for p in corpus.PACKAGES]
    assert len(names) == len(set(names))
    assert {p.split for p in corpus.PACKAGES} == set(corpus.SPLITS)
    assert all(c in corpus.CATEGORIES for p in corpus.PACKAGES for _g, c in p.categories)
    hw = next(p for p in corpus.PACKAGES if p.name == "hedgewars-data")
    data = "usr/share/games/hedgewars/Data"
    assert hw.category(f"{data}/Sounds/voices/British/Amazing.ogg") == "speech"
    assert hw.category(f"{data}/Music/main.ogg") == "music"
    assert hw.category(f"{data}/Sounds/explosion.ogg") == "effects"
    assert select_packages(["drascula-music", "singularity-music"]) == [
        p for p in corpus.PACKAGES if p.name in ("singularity-music", "drascula-music")]
    with pytest.raises(CorpusError, match="not-a-package"):
        select_packages(["not-a-package"])


# ---------------------------------------------------------------------------------------------------
# fetch_package, with apt-get and dpkg faked


class FakeRun:
    """Stands in for subprocess.run: records commands, `dpkg -x` writes one file, apt-get as told."""

    def __init__(self, apt_rc: int = 0):
        self.calls: list[list[str]] = []
        self.apt_rc = apt_rc

    def __call__(self, cmd, capture_output=True, text=True, cwd=None):
        self.calls.append([Path(cmd[0]).name, *cmd[1:]])
        tool = Path(cmd[0]).name
        if tool == "apt-get":
            if self.apt_rc:
                return subprocess.CompletedProcess(cmd, self.apt_rc, "", "E: Unable to locate package foo")
            (Path(cwd) / f"{cmd[2]}_2.0-1_all.deb").write_bytes(b"deb")
        elif tool == "dpkg-deb":
            return subprocess.CompletedProcess(cmd, 0, Path(cmd[2]).name.split("_")[1] + "\n", "")
        elif tool == "dpkg" and cmd[1] == "-x":
            (Path(cmd[3]) / "usr").mkdir(parents=True)
            (Path(cmd[3]) / "usr/file").write_text("x")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_fetch_package_downloads_extracts_and_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    run = FakeRun()
    got = fetch_package("foo", tmp_path / "debs", tmp_path / "x", run=run)
    assert got == Extracted("foo", "2.0-1", tmp_path / "x" / "foo")
    assert (got.root / "usr/file").read_text() == "x"
    assert [c[:2] for c in run.calls] == [["apt-get", "download"], ["dpkg-deb", "-f"], ["dpkg", "-x"]]
    assert sorted(p.name for p in (tmp_path / "debs").iterdir()) == ["foo_2.0-1_all.deb"]
    run.calls.clear()
    assert fetch_package("foo", tmp_path / "debs", tmp_path / "x", run=run) == got
    assert [c[:2] for c in run.calls] == [["dpkg-deb", "-f"]]  # cached .deb, already extracted


def test_fetch_package_uses_a_deb_already_there(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "apt-get" else f"/bin/{name}")
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "foo_1.5_all.deb").write_bytes(b"deb")
    (tmp_path / "debs" / "foo-data_9_all.deb").write_bytes(b"another package")
    run = FakeRun()
    assert fetch_package("foo", tmp_path / "debs", tmp_path / "x", run=run).version == "1.5"
    assert [c[0] for c in run.calls] == ["dpkg-deb", "dpkg"]


def test_fetch_package_errors_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match=r"foo: `apt-get` not found"):
        fetch_package("foo", tmp_path / "debs", tmp_path / "x", run=FakeRun())
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(CorpusError, match=r"foo: .*apt-get download foo.* failed \(exit 100\)"
                       r".*Unable to locate.*apt-get update"):
        fetch_package("foo", tmp_path / "debs", tmp_path / "x", run=FakeRun(apt_rc=100))
    assert not list((tmp_path / "debs").iterdir())  # no partial download left behind


# ---------------------------------------------------------------------------------------------------
# the whole build over fake extracted packages

SOUNDS = Package("fake-sounds", "train", (
    ("usr/share/fake/voices/*", "speech"),
    ("usr/share/fake/music/*", "music"),
    ("usr/share/fake/*", "effects"),
))
WORDS = Package("fake-words", "heldout", (("usr/share/words/speech/*", "speech"), ("*", "music")))
CAP_MINUTES = 6.0 / 60  # fake-words: 1 s of speech and 7 s of music -> speech 1 s, music 5 s
COPYRIGHT = "Format: x\n\nFiles: *\nLicense: GPL-2+\n\nFiles: music/*\nLicense: CC-BY-SA-3.0\n"

SOUNDS_STATUS = {
    "usr/share/fake/voices/HELLO2.WAV": "kept",
    "usr/share/fake/voices/a_take.wav": "kept",
    "usr/share/fake/voices/b_same_take.wav": "duplicate",
    "usr/share/fake/voices/link.wav": "symlink",
    "usr/share/fake/music/dull.flac": "band_limited",
    "usr/share/fake/music/song.flac": "kept",
    "usr/share/fake/sfx/boom.wav": "kept",
    "usr/share/fake/sfx/broken.ogg": "unreadable",
    "usr/share/fake/sfx/click.wav": "too_short",
    "usr/share/fake/sfx/old.wav": "low_sample_rate",
    "usr/share/fake/sfx/quiet.wav": "silent",
}
WORDS_STATUS = {
    "usr/share/words/speech/one.wav": "kept",
    "usr/share/words/tunes/t1.wav": "kept",
    "usr/share/words/tunes/t2.wav": "over_cap",
    "usr/share/words/tunes/t3.wav": "kept",
}


def _write(root: Path, rel: str, data: np.ndarray, sr: int = SR, **kw) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, **kw)


def make_packages(base: Path) -> dict[str, Path]:
    """Two unpacked packages, as `dpkg -x` would leave them."""
    a = base / "fake-sounds"
    _write(a, "usr/share/fake/voices/a_take.wav", noise(1.0, sr=48000, seed=1), sr=48000)
    voices = a / "usr/share/fake/voices"
    (voices / "b_same_take.wav").write_bytes((voices / "a_take.wav").read_bytes())
    os.symlink("a_take.wav", voices / "link.wav")
    _write(a, "usr/share/fake/voices/HELLO2.WAV", noise(0.8, seed=2), format="WAV")
    _write(a, "usr/share/fake/music/song.flac", noise(2.0, channels=2, seed=3))
    _write(a, "usr/share/fake/music/dull.flac", lowpass(noise(2.0, seed=4), 8000.0), subtype="PCM_24")
    _write(a, "usr/share/fake/sfx/click.wav", noise(0.2, seed=5))
    _write(a, "usr/share/fake/sfx/quiet.wav", np.zeros((SR, 1)))
    _write(a, "usr/share/fake/sfx/old.wav", noise(1.0, sr=22050, seed=6), sr=22050)
    _write(a, "usr/share/fake/sfx/boom.wav", noise(1.0, seed=7))
    (a / "usr/share/fake/sfx/broken.ogg").write_bytes(b"OggS" + bytes(range(256)) * 8)
    (a / "usr/share/fake/sfx/readme.txt").write_text("not audio")
    (a / "usr/share/doc/fake-sounds").mkdir(parents=True)
    (a / "usr/share/doc/fake-sounds/copyright").write_text(COPYRIGHT)
    b = base / "fake-words"
    _write(b, "usr/share/words/speech/one.wav", noise(1.0, seed=8))
    for name, seconds in (("t1", 3.0), ("t2", 3.0), ("t3", 1.0)):
        _write(b, f"usr/share/words/tunes/{name}.wav", noise(seconds, seed=9 + int(name[1])))
    return {"fake-sounds": a, "fake-words": b}


class FakeFetch:
    """The apt/dpkg step for the fake packages; fails for `broken` (an interrupted run)."""

    def __init__(self, roots: dict[str, Path], broken: str | None = None):
        self.roots, self.broken, self.calls = roots, broken, []

    def __call__(self, name: str, download_dir: Path, extract_dir: Path) -> Extracted:
        self.calls.append((name, download_dir, extract_dir))
        if name == self.broken:
            raise CorpusError(f"{name}: the network went away")
        return Extracted(name, "1.0-1", self.roots[name])


def _minutes(seconds: float) -> float:
    return round(seconds / 60, 3)


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under out except the cache."""
    return {p.relative_to(out).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in out.rglob("*") if p.is_file() and "cache" not in p.relative_to(out).parts}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return make_packages(tmp_path_factory.mktemp("extracted"))


def build(out: Path, roots, packages=(SOUNDS, WORDS), cap=CAP_MINUTES, **kw):
    fetch = kw.pop("fetch", None) or FakeFetch(roots)
    return build_corpus(out, packages, criteria=Criteria(max_minutes_per_package=cap), fetch=fetch, **kw)


def test_build_splits_screens_and_writes_manifests(tmp_path, roots):
    out = tmp_path / "corpus"
    fetch = FakeFetch(roots)
    report = build(out, roots, fetch=fetch, download_dir=tmp_path / "debs")
    assert [c[0] for c in fetch.calls] == ["fake-sounds", "fake-words"]
    assert fetch.calls[0][1:] == (tmp_path / "debs", out / "cache" / "extracted")
    sounds, words = report.packages
    assert {f.path: f.status for f in sounds.files} == SOUNDS_STATUS
    assert {f.path: f.status for f in words.files} == WORDS_STATUS
    assert {f.path: f.category for f in sounds.files if f.status == "kept"} == {
        "usr/share/fake/voices/HELLO2.WAV": "speech", "usr/share/fake/voices/a_take.wav": "speech",
        "usr/share/fake/music/song.flac": "music", "usr/share/fake/sfx/boom.wav": "effects"}
    dull = next(f for f in sounds.files if f.path.endswith("dull.flac"))
    assert dull.bandwidth == pytest.approx(8000, abs=1000)

    train = [f"train/fake-sounds/{p}" for p in sorted(p for p, s in SOUNDS_STATUS.items() if s == "kept")]
    held = [f"heldout/fake-words/{p}" for p in sorted(p for p, s in WORDS_STATUS.items() if s == "kept")]
    expected = {"train.txt": train, "heldout.txt": held, "heldout-speech.txt": held[:1],
                "heldout-music.txt": held[1:]}
    assert report.manifests == expected
    assert sorted(p.name for p in out.glob("*.txt")) == sorted(expected)
    for name, lines in expected.items():
        assert list_audio_files(out / name) == [out / line for line in lines]
    for line in train + held:
        package, rel = line.split("/")[1], line.split("/", 2)[2]
        assert (out / line).read_bytes() == (roots[package] / rel).read_bytes()
    copied = sorted(p.relative_to(out).as_posix() for p in (out / "train").rglob("*") if p.is_file())
    assert copied == sorted(train)
    assert (out / "licences/fake-sounds.copyright").read_text() == COPYRIGHT
    assert not (out / "licences/fake-words.copyright").exists()

    meta = json.loads((out / "corpus.json").read_text())
    assert meta["packages"]["fake-sounds"] == {
        "version": "1.0-1",
        "split": "train",
        "licence": "GPL-2+, CC-BY-SA-3.0",
        "copyright": "licences/fake-sounds.copyright",
        "files_kept": 4,
        "files_rejected": 7,
        "rejected": {"symlink": 1, "duplicate": 1, "unreadable": 1, "low_sample_rate": 1, "too_short": 1,
                     "silent": 1, "band_limited": 1},
        "minutes": {"speech": _minutes(1.8), "music": _minutes(2.0), "effects": _minutes(1.0)},
        "minutes_total": _minutes(4.8),
        "minutes_full_band": _minutes(4.8),
        "sample_rates": {"44100": 3, "48000": 1},
        "bandwidth_hz": {"min": 22050, "median": 22050, "max": 24000},
    }
    assert meta["packages"]["fake-words"] == {
        "version": "1.0-1",
        "split": "heldout",
        "licence": "unknown (no usr/share/doc/<package>/copyright in the .deb)",
        "copyright": None,
        "files_kept": 3,
        "files_rejected": 1,
        "rejected": {"over_cap": 1},
        "minutes": {"speech": _minutes(1.0), "music": _minutes(4.0), "effects": 0.0},
        "minutes_total": _minutes(5.0),
        "minutes_full_band": _minutes(8.0),
        "sample_rates": {"44100": 3},
        "bandwidth_hz": {"min": 22050, "median": 22050, "max": 22050},
    }
    assert meta["totals_minutes"] == {
        "train": {"speech": _minutes(1.8), "music": _minutes(2.0), "effects": _minutes(1.0)},
        "heldout": {"speech": _minutes(1.0), "music": _minutes(4.0), "effects": 0.0}}
    assert meta["criteria"]["max_minutes_per_package"] == CAP_MINUTES
    assert meta["manifests"] == sorted(expected)


def test_rerun_changes_nothing_and_an_interrupted_run_is_finished(tmp_path, roots):
    out = tmp_path / "corpus"
    # interrupted: the second package cannot be fetched; no manifest may exist yet
    with pytest.raises(CorpusError, match="fake-words"):
        build(out, roots, fetch=FakeFetch(roots, broken="fake-words"))
    assert not list(out.glob("*.txt")) and not (out / "corpus.json").exists()
    assert (out / "train/fake-sounds/usr/share/fake/sfx/boom.wav").is_file()
    first = build(out, roots)
    assert [p.scanned for p in first.packages] == [False, True]  # fake-sounds' screening was kept
    assert [p.copied for p in first.packages] == [0, 3]
    done = _snapshot(out)

    again = build(out, roots)
    assert not again.changed and again.written == []
    assert [(p.scanned, p.copied) for p in again.packages] == [(False, 0), (False, 0)]
    assert _snapshot(out) == done

    # a lost file and a lost manifest come back, and only they
    (out / "train/fake-sounds/usr/share/fake/music/song.flac").unlink()
    (out / "heldout.txt").unlink()
    fixed = build(out, roots)
    assert [p.copied for p in fixed.packages] == [1, 0] and fixed.written == ["heldout.txt"]
    assert {k for k, v in _snapshot(out).items() if done.get(k) != v} == {
        "train/fake-sounds/usr/share/fake/music/song.flac", "heldout.txt"}


def test_cap_and_selection_changes_prune_the_output(tmp_path, roots):
    out = tmp_path / "corpus"
    build(out, roots)
    t2 = out / "heldout/fake-words/usr/share/words/tunes/t2.wav"
    assert not t2.exists()
    wide = build(out, roots, cap=30.0)
    assert [p.scanned for p in wide.packages] == [False, False]  # a new cap needs no new screening
    assert t2.is_file() and "heldout/fake-words/usr/share/words/tunes/t2.wav" in wide.manifests["heldout.txt"]
    build(out, roots)
    assert not t2.exists()

    only = build(out, roots, packages=(SOUNDS,))
    assert not (out / "heldout/fake-words").exists()
    assert only.manifests["heldout.txt"] == [] and not (out / "heldout-speech.txt").exists()
    assert list(json.loads((out / "corpus.json").read_text())["packages"]) == ["fake-sounds"]


def test_bad_table_entries_are_refused(tmp_path, roots):
    with pytest.raises(CorpusError, match="split"):
        build(tmp_path / "c", roots, packages=(Package("fake-sounds", "test", (("*", "music"),)),))
    with pytest.raises(CorpusError, match="categories"):
        build(tmp_path / "c", roots, packages=(Package("fake-sounds", "train", (("*", "noise"),)),))
