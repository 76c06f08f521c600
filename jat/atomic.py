"""Atomic file writes: every file is written to a temporary file beside it, then moved into place whole.

The temporary file (`temp_path`) is hidden, sits in the target's folder (so the move is a rename on one
file system) and carries the writer's pid: `.name.<pid>.tmp.ext`, the real extension last so that writers
which infer the format from the name (soundfile, matplotlib) write the right one. `write_atomic` fills it
through a callback and moves it into place (`place`): with `overwrite`, `os.replace`; without, a hard link
that fails if the name exists, even one that appeared while writing. On any failure (an exception from the
callback, an interrupt) the temporary file is removed and a previous file at the target is untouched. A
writer killed mid-write leaves its temporary file, which `remove_stale_temps` recognises by its dead pid.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class TargetExistsError(FileExistsError):
    """`place` (or `write_atomic`) without overwrite found the target's name taken."""


def temp_path(path: str | Path) -> Path:
    """The temporary file this process writes `path` through: `.name.<pid>.tmp.ext` beside it."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_atomic(path: str | Path, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Create `path` through `write(tmp)` on its `temp_path`, then `place` it; returns `path`.

    Missing parent folders are created. The temporary file is made afresh (a leftover of a dead process
    with this pid is replaced), exclusively and with a new file's usual permissions (0o666 less the
    umask), before `write` fills it. Whatever fails, it is removed; without `overwrite` an existing
    `path` is a TargetExistsError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def place(tmp: Path, path: Path, overwrite: bool = True) -> None:
    """Move a finished temporary file to `path` atomically. Without `overwrite` never replace a file:
    TargetExistsError if `path` exists, whenever it appeared (a hard link fails on a taken name); on a
    file system without hard links, the check and the rename are two steps. Without `overwrite`, `tmp`
    is left for the caller to remove."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists
    except FileExistsError:
        raise TargetExistsError(errno.EEXIST, "file exists", str(path)) from None
    except OSError:  # no hard links on this file system
        if path.exists():
            raise TargetExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files of `path` (`temp_path`) left by writers that were killed, and return
    them. A file is stale when no process has its pid; one of a live process (this one included) is
    never touched, nor one whose name holds no pid. Only pids of this machine (and pid namespace) can be
    checked: a writer elsewhere on a shared folder would look dead."""
    path = Path(path)
    head, tail = f".{path.stem}.", f".tmp{path.suffix}"
    removed: list[Path] = []
    try:
        names = [p.name for p in path.parent.iterdir()]
    except OSError:  # a missing or unreadable folder holds no leftovers that we could remove
        return removed
    for name in names:
        pid = name[len(head) : -len(tail)] if name.startswith(head) and name.endswith(tail) else ""
        if pid.isdigit() and _dead(int(pid)):
            try:
                (path.parent / name).unlink()
            except OSError as exc:
                log.warning("%s: cannot remove this killed writer's leftover (%s)", path.parent / name, exc)
                continue
            removed.append(path.parent / name)
    return removed


def _dead(pid: int) -> bool:
    """Whether no process has this pid (signal 0 only asks). Unsure means alive: a process of another
    user answers PermissionError, a number that is no pid at all OverflowError."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False
