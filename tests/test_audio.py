"""Audio I/O: round trips, resampling, layout, every error kind, atomic saving, file discovery."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import CHILD_ENV, without_root_powers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import AudioError, audio_info, list_audio_files, load_audio, resample, save_audio

SR = SAMPLE_RATE


def stereo(seconds: float = 0.25, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1234 * t + 1)
    return np.stack([left, right]).astype(np.float32)  # [2, L]


@pytest.mark.parametrize(
    "ext,subtype,step",
    [
        ("wav", "PCM_U8", 2**-7), ("wav", "PCM_16", 2**-15), ("wav", "PCM_24", 2**-23), ("wav", "FLOAT", 0.0),
        ("flac", "PCM_S8", 2**-7), ("flac", "PCM_16", 2**-15), ("flac", "PCM_24", 2**-23),
    ],
)
def test_round_trip_bit_depths(tmp_path, ext, subtype, step):
    x = stereo()  # [2, L]
    path = save_audio(tmp_path / f"a.{ext}", x, SR, subtype=subtype)
    assert soundfile.info(str(path)).subtype == subtype
    y = load_audio(path)
    assert y.dtype == torch.float32 and tuple(y.shape) == x.shape
    err = float((y - torch.from_numpy(x)).abs().max())
    assert err <= step  # at most one quantisation step; exact for float
    if step:
        assert err > 0  # quantisation really happened at that depth


def test_lossy_ogg_loads(tmp_path):
    x = stereo(0.5)
    save_audio(tmp_path / "a.ogg", x, SR)
    y = load_audio(tmp_path / "a.ogg")
    assert y.shape[0] == 2 and abs(y.shape[1] - x.shape[1]) < 2048
    n = min(y.shape[1], x.shape[1])
    corr = np.corrcoef(y[0, :n].numpy(), x[0, :n])[0, 1]
    assert corr > 0.95


def test_resample_48k_to_44k_length_and_tone(tmp_path):
    sr = 48000
    t = np.arange(sr) / sr
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    save_audio(tmp_path / "a.wav", x, sr, subtype="FLOAT")
    y = load_audio(tmp_path / "a.wav")  # [1, 44100]
    assert tuple(y.shape) == (1, 44100)
    spec = np.abs(np.fft.rfft(y[0].numpy()))
    assert abs(np.argmax(spec) - 1000) <= 1  # 1 Hz bins: still a 1 kHz tone
    core = y[0, 2000:-2000].numpy()  # away from the edges
    assert np.sqrt(np.mean(core**2)) == pytest.approx(0.5 / np.sqrt(2), rel=2e-3)
    assert audio_info(tmp_path / "a.wav") == (48000, 1, 48000)


def test_resample_wrapper_is_identity_at_equal_rates_and_band_limits():
    x = torch.randn(2, 3, 4410)
    assert resample(x, SR, SR) is x
    y = resample(x, SR, 16000)  # [2, 3, 1600]
    assert tuple(y.shape) == (2, 3, 1600)
    with pytest.raises(ValueError):
        resample(x, 0, SR)


def test_multichannel_layout_kept_and_mono(tmp_path):
    n = 2048
    x = np.stack([np.full(n, v, dtype=np.float32) for v in (0.1, -0.2, 0.3, 0.4)])  # [4, L] distinct channels
    save_audio(tmp_path / "multi.wav", x, SR, subtype="FLOAT")
    y = load_audio(tmp_path / "multi.wav")
    assert tuple(y.shape) == (4, n)
    assert torch.allclose(y[:, 100], torch.tensor([0.1, -0.2, 0.3, 0.4]))
    m = load_audio(tmp_path / "multi.wav", mono=True)
    assert tuple(m.shape) == (1, n) and float(m[0, 100]) == pytest.approx(0.15)
    native = load_audio(tmp_path / "multi.wav", target_sr=None)
    assert torch.equal(native, y)


def _write_raw(path: Path, data: np.ndarray, subtype: str = "FLOAT") -> Path:
    soundfile.write(str(path), data, SR, subtype=subtype)
    return path


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda d: d / "missing.wav", "not found"),
        (lambda d: d, "not a file"),
        (lambda d: (d / "text.wav").write_text("not audio") and d / "text.wav", "not a readable audio file"),
        (lambda d: _write_raw(d / "empty.wav", np.zeros((0, 1), np.float32)), "empty"),
        (lambda d: _write_raw(d / "silent.wav", np.zeros((1000, 2), np.float32), "PCM_16"), "silent"),
        (lambda d: _write_raw(d / "nan.wav", np.r_[np.ones(10), np.nan, 1].astype(np.float32)), "NaN/Inf"),
        (lambda d: _write_raw(d / "inf.wav", np.r_[np.ones(10), np.inf].astype(np.float32)), "NaN/Inf"),
    ],
)
def test_load_errors_name_the_file_and_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value) and reason in str(info.value)


READ = """
import sys
from jat.data.audio import AudioError, audio_info, load_audio
for read in (audio_info, load_audio):
    try:
        read(sys.argv[1])
    except AudioError as exc:
        print(exc)
"""


def test_unreadable_file_names_the_cause(tmp_path):
    path = _write_raw(tmp_path / "x.wav", stereo().T)
    path.chmod(0o000)
    cmd = [*without_root_powers(), sys.executable, "-c", READ, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{path}: cannot read (Permission denied)"] * 2
    path.chmod(0o644)
    path.write_bytes(b"not audio" * 50)  # readable, but no format soundfile knows
    for read in (audio_info, load_audio):
        with pytest.raises(AudioError) as info:
            read(path)
        assert str(info.value) == f"{path}: not a readable audio file (soundfile: Format not recognised.)"


def test_saved_file_has_the_usual_permissions_and_no_temporary_left(tmp_path):
    # (the temporary file's name, with the writer's pid: tests/test_inference.py kills a writer mid-write)
    save_audio(tmp_path / "out.wav", stereo(), SR)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.wav").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_allow_silent(tmp_path):
    path = _write_raw(tmp_path / "silent.wav", np.zeros((1000, 2), np.float32))
    y = load_audio(path, allow_silent=True)
    assert tuple(y.shape) == (2, 1000) and float(y.abs().max()) == 0.0


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = save_audio(tmp_path / "out.wav", stereo(), SR)
    before = path.read_bytes()

    def broken_write(file, *args, **kwargs):
        Path(file).write_bytes(b"partial garbage")  # a write that dies half way
        raise OSError("disk full")

    monkeypatch.setattr(soundfile, "write", broken_write)
    with pytest.raises(AudioError) as info:
        save_audio(path, np.zeros((2, 100), np.float32) + 0.1, SR)
    assert str(path) in str(info.value) and "disk full" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temporary file left


def test_save_rejects_bad_audio_and_makes_folders(tmp_path):
    with pytest.raises(AudioError, match="NaN"):
        save_audio(tmp_path / "x.wav", np.array([0.0, np.nan]), SR)
    with pytest.raises(AudioError, match=r"\[C, L\]"):
        save_audio(tmp_path / "x.wav", np.zeros((1, 2, 3)), SR)
    path = save_audio(tmp_path / "a" / "b" / "mono.flac", torch.full((500,), 0.25), SR)
    y = load_audio(path)
    assert tuple(y.shape) == (1, 500) and float(y[0, 0]) == pytest.approx(0.25, abs=2**-15)
    assert not (tmp_path / "x.wav").exists()


def test_list_audio_files_folder_manifest_single(tmp_path):
    for rel in ("b/2.flac", "a/1.wav", "a/deep/3.OGG", "c.mp3", "notes.txt", "a/.hidden.wav", "x.aiff"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files = list_audio_files(tmp_path)
    names = [f.relative_to(tmp_path).as_posix() for f in files]
    assert names == ["a/1.wav", "a/deep/3.OGG", "b/2.flac", "c.mp3", "x.aiff"]
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# training files\n\na/1.wav\n  b/2.flac  \n{tmp_path / 'c.mp3'}\n")
    assert list_audio_files(manifest) == [tmp_path / "a/1.wav", tmp_path / "b/2.flac", tmp_path / "c.mp3"]
    assert list_audio_files(tmp_path / "c.mp3") == [tmp_path / "c.mp3"]


@pytest.mark.parametrize(
    "setup,reason",
    [
        (lambda d: d / "nope", "not found"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no audio files"),
        (lambda d: (d / "m.txt").write_text("# nothing\n\n") and d / "m.txt", "lists no audio files"),
        (lambda d: (d / "m.txt").write_text("a.wav\nmissing.wav\n") and d / "m.txt", "m.txt:2"),
        (lambda d: (d / "data.csv").write_text("x") and d / "data.csv", "not a folder"),
    ],
)
def test_list_audio_files_errors(tmp_path, setup, reason):
    (tmp_path / "a.wav").write_bytes(b"")
    source = setup(tmp_path)
    with pytest.raises(AudioError, match=reason):
        list_audio_files(source)


_HEADER = None


def _wav_header() -> bytes:
    global _HEADER
    if _HEADER is None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "h.wav"
            soundfile.write(str(path), np.zeros(16, np.int16), SR, subtype="PCM_16")
            _HEADER = path.read_bytes()[:44]
    return _HEADER


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=512), with_header=st.booleans(), cut=st.integers(0, 44))
def test_random_bytes_load_or_raise_audio_error(body, with_header, cut):
    data = (_wav_header()[:cut] if with_header else b"") + body
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.wav"
        path.write_bytes(data)
        try:
            y = load_audio(path, allow_silent=True)
        except AudioError as exc:
            assert str(path) in str(exc)
        else:
            assert y.dtype == torch.float32 and y.ndim == 2 and bool(torch.isfinite(y).all())
