"""One training run per output folder: an exclusive lock on `output_dir/.lock`.

Two runs writing into one folder would interleave their checkpoints, and one's `begin_save` would
delete the other's temporary checkpoint. The lock is `fcntl.flock` (exclusive, non-blocking) on
an open descriptor of `.lock`: the OS drops it when the holding process exits, however it exits
(SIGKILL included), so a lock is never stale and there is nothing to clean up. The file's content
(holder pid, host, start time) only serves the message shown to a second run.

Within one process the lock is counted rather than taken twice (flock would refuse a second
descriptor even in the same process): several Trainers on one folder, one after the other, as a
resumed run in a test or a notebook makes them, share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jat.checkpoint.store import CheckpointError

LOCK_NAME = ".lock"
_held: dict[str, list[int]] = {}  # real folder path -> [descriptor, holders in this process]


class RunLockedError(CheckpointError):
    """The output folder is in use by another run."""


def _holder(fd: int) -> str:
    """'pid 1234 on host h since 2026-...' from a lock file's content, as far as it can be read."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # holder between its lock and its write
        return "another run (holder not recorded yet)"


class RunLock:
    """The lock of one output folder; `acquire` raises RunLockedError naming the holder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.held = False

    def acquire(self) -> None:
        """Take the lock (a no-op when this object holds it already). Creates the folder if needed;
        writes nothing when the folder is taken."""
        if self.held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key not in _held:
            fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLockedError(f"{self.folder} is in use by {holder}; stop that run or choose "
                                     "another train.output_dir") from None
            except BaseException:
                os.close(fd)
                raise
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            _held[key] = [fd, 0]
        _held[key][1] += 1
        self.held = True
        self._key = key

    def release(self) -> None:
        """Give the lock up (a no-op when not held); the last holder in this process unlocks it."""
        if not self.held:
            return
        self.held = False
        entry = _held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self._key]
            with contextlib.suppress(OSError):  # no stale holder for whoever reads it before the next writes
                os.ftruncate(entry[0], 0)
            os.close(entry[0])  # closing the descriptor drops the flock

    def __del__(self) -> None:  # an abandoned Trainer must not keep the folder locked for the process's life
        try:
            self.release()
        except Exception:  # interpreter shutdown (module globals gone): the OS drops the lock anyway
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
