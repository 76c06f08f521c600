"""The corpus's file helpers: JSON caches, writes and copies that touch a file only when its bytes change
(each through `jat.atomic.write_atomic`), and content hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from jat.atomic import write_atomic

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# files on disk, atomically


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_changed(path: Path, data: bytes) -> bool:
    """Write data to path atomically (`write_atomic`); False (nothing written) if it already holds it."""
    if path.is_file() and path.read_bytes() == data:
        return False
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return True


def write_json(path: Path, obj) -> bool:
    return write_changed(path, (json.dumps(obj, indent=2) + "\n").encode())


def copy_changed(src: Path, dst: Path) -> bool:
    """Copy src to dst atomically (`write_atomic`); False (nothing copied) if dst already has src's size."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return False
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))
    return True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
