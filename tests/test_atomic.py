"""Atomic writes (jat.atomic): no partial file, no leftover temporary file, no overwrite unless asked."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CHILD_ENV

from jat import atomic
from jat.atomic import TargetExistsError, place, remove_stale_temps, temp_path, write_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_temp_path_is_hidden_beside_the_target_with_pid_and_extension_last(tmp_path):
    assert temp_path(tmp_path / "a" / "song_jat.wav") == tmp_path / "a" / f".song_jat.{os.getpid()}.tmp.wav"
    assert temp_path("meta.json").name == f".meta.{os.getpid()}.tmp.json"
    assert temp_path("x.tar.gz").name == f".x.tar.{os.getpid()}.tmp.gz"


def test_write_atomic_writes_through_the_temp_path(tmp_path):
    seen = []

    def write(tmp: Path) -> None:
        seen.append((tmp, tmp.exists(), tmp.stat().st_size))
        tmp.write_bytes(b"hello")

    path = tmp_path / "sub" / "dir" / "out.bin"  # parents are created
    assert write_atomic(path, write) == path
    assert seen == [(temp_path(path), True, 0)]  # created empty before the writer runs
    assert path.read_bytes() == b"hello" and _names(path.parent) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual permissions
    write_atomic(path, lambda tmp: tmp.write_bytes(b"again"))  # overwrite is the default
    assert path.read_bytes() == b"again" and _names(path.parent) == ["out.bin"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_failing_writer_leaves_no_file_and_no_temp(tmp_path, error):
    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"partial garbage")  # a write that dies half way
        raise error

    with pytest.raises(type(error)):
        write_atomic(tmp_path / "new.bin", broken)
    assert _names(tmp_path) == []
    old = tmp_path / "old.bin"
    old.write_bytes(b"previous")
    for overwrite in (True, False):
        with pytest.raises(type(error)):
            write_atomic(old, broken, overwrite=overwrite)
        assert old.read_bytes() == b"previous" and _names(tmp_path) == ["old.bin"]


def test_no_overwrite_refuses_an_existing_target_and_leaves_it_intact(tmp_path):
    path = tmp_path / "out.wav"
    path.write_bytes(b"theirs")
    with pytest.raises(TargetExistsError) as err:
        write_atomic(path, lambda tmp: tmp.write_bytes(b"mine"), overwrite=False)
    assert isinstance(err.value, FileExistsError) and err.value.errno == errno.EEXIST
    assert err.value.filename == str(path)
    assert path.read_bytes() == b"theirs" and _names(tmp_path) == ["out.wav"]

    late = tmp_path / "late.wav"  # a name that appears while writing is refused too

    def racing(tmp: Path) -> None:
        tmp.write_bytes(b"mine")
        late.write_bytes(b"other writer")

    with pytest.raises(TargetExistsError):
        write_atomic(late, racing, overwrite=False)
    assert late.read_bytes() == b"other writer" and _names(tmp_path) == ["late.wav", "out.wav"]
    write_atomic(tmp_path / "free.wav", lambda tmp: tmp.write_bytes(b"mine"), overwrite=False)
    assert (tmp_path / "free.wav").read_bytes() == b"mine"
    assert _names(tmp_path) == ["free.wav", "late.wav", "out.wav"]


def test_place_without_hard_links_still_refuses_a_taken_name(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    tmp, path = tmp_path / ".t.tmp", tmp_path / "out.bin"
    tmp.write_bytes(b"new")
    place(tmp, path, overwrite=False)  # falls back to a rename
    assert path.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"newer")
    with pytest.raises(TargetExistsError):
        place(tmp, path, overwrite=False)
    assert path.read_bytes() == b"new" and tmp.read_bytes() == b"newer"  # tmp is the caller's to remove
    place(tmp, path)
    assert path.read_bytes() == b"newer" and not tmp.exists()


def test_a_dead_writers_leftover_with_our_pid_is_replaced(tmp_path):
    path = tmp_path / "out.json"
    temp_path(path).write_bytes(b"left by a dead process whose pid we now have")
    write_atomic(path, lambda tmp: tmp.write_text("{}"))
    assert path.read_text() == "{}" and _names(tmp_path) == ["out.json"]


def test_remove_stale_temps_only_removes_dead_writers_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".out.{dead.pid}.tmp.wav": False, f".out.{os.getpid()}.tmp.wav": True,
                 f".out.{alive.pid}.tmp.wav": True,  # a live writer's file is never touched
                 f".out.{dead.pid}.tmp.flac": True, f".other.{dead.pid}.tmp.wav": True,  # other outputs'
                 f".out.x.{dead.pid}.tmp.wav": True,  # (out.flac, other.wav, out.x.wav)
                 ".out.abc.tmp.wav": True}  # no pid in it (an older version's random name)
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        assert remove_stale_temps(tmp_path / "out.wav") == [tmp_path / f".out.{dead.pid}.tmp.wav"]
        assert {p.name for p in tmp_path.iterdir()} == {name for name, kept in names.items() if kept}
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_temps(tmp_path / "missing" / "out.wav") == []


def test_killed_writer_leaves_a_temp_that_the_next_run_removes(tmp_path):
    path = tmp_path / "shard.safetensors"
    script = ("import os, sys; from pathlib import Path; from jat.atomic import write_atomic; "
              "write_atomic(Path(sys.argv[1]), lambda tmp: (tmp.write_bytes(b'half'), os._exit(9)))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], env=CHILD_ENV)
    assert proc.wait(timeout=120) == 9
    leftover = tmp_path / f".shard.{proc.pid}.tmp.safetensors"
    assert _names(tmp_path) == [leftover.name] and leftover.read_bytes() == b"half"
    assert remove_stale_temps(path) == [leftover] and _names(tmp_path) == []
