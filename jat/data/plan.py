"""The pre-encoding's work plan (jat/data/precompute.py): which rows go into which shard, read from the
files' headers or from a cache of them, and a fingerprint of each shard's work.

Every file's channels are cut into fixed segments (the last one right-padded, a whole short clip padded;
a tail shorter than `MIN_TAIL` of a segment is dropped when the file has other segments), and the
resulting units (file, channel, segment) of the sorted files fill shards of `shard_size` in order. The
plan depends on nothing else, so every process of a split pre-encoding plans the same shards.

The header cache (`HEADERS` beside the shards) keeps each usable file's size, modification time, rate,
channels and length, so a later plan opens only files that are new or changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jat.atomic import write_atomic
from jat.config import DataConfig
from jat.data.datasets import AudioInfo, scan_audio_files

log = logging.getLogger(__name__)

HEADERS = "headers.json"  # the header cache beside the shards (`scan_headers`)
MIN_TAIL = 0.25  # fraction of a segment the last piece of a longer file must reach to be kept


@dataclass(frozen=True)
class Unit:
    """One row of a shard: a segment of one channel of one file."""

    key: str  # the file as stored in shards (relative to the data root when under it)
    path: Path
    channel: int
    segment: int


def file_key(path: Path, root: Path | None) -> str:
    """The stored name of a file: relative to `root` when inside it, else the path as given."""
    if root is not None and root.is_dir():
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def num_segments(length: int, segment: int) -> int:
    """Segments of a `length`-sample channel: full ones, plus a tail reaching MIN_TAIL; at least 1."""
    full, tail = divmod(length, segment)
    return max(1, full + (tail >= MIN_TAIL * segment))


def scan_headers(files: Sequence[Path], strict: bool, cache: Path | None
                 ) -> tuple[list[AudioInfo], dict[str, str]]:
    """`scan_audio_files`, except that files whose size and modification time match the header cache
    `cache` (see `save_headers`) are not opened. Returns the usable files in path order."""
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    infos, unknown = [], []
    for path in files:
        entry = known.get(str(path))
        try:
            st = path.stat()
        except OSError:
            entry = None
        if entry is not None and entry[:2] == [st.st_size, st.st_mtime_ns]:
            infos.append(AudioInfo(path, *entry[2:]))
        else:
            unknown.append(path)
    scanned, skipped = scan_audio_files(unknown, strict)
    log.info("headers: %d from the cache, %d read", len(infos), len(scanned))
    return sorted(infos + scanned, key=lambda i: i.path), skipped


def save_headers(cache: Path, infos: Sequence[AudioInfo]) -> None:
    """Write the header cache: {path: [size, mtime_ns, sample_rate, channels, frames]} of usable files
    (bad ones are read again each time)."""
    known = {}
    for i in infos:
        st = i.path.stat()
        known[str(i.path)] = [st.st_size, st.st_mtime_ns, i.sample_rate, i.channels, i.frames]
    text = json.dumps(known, sort_keys=True)
    write_atomic(cache, lambda tmp: tmp.write_text(text))


def cache_headers(files: Sequence[str | Path], out_dir: str | Path, strict: bool = False) -> None:
    """Read (or refresh) the header cache of `files` in `out_dir` now: done by one process before the
    others plan (jat-precompute under accelerate launch), so that they read no file's header."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos, _ = scan_headers(sorted(Path(f) for f in files), strict, out / HEADERS)
    save_headers(out / HEADERS, infos)


def plan_shards(files: Sequence[str | Path], cfg: DataConfig, sample_rate: int, shard_size: int,
                root: Path | None = None, headers: Path | None = None
                ) -> tuple[list[list[Unit]], dict[str, str], list[AudioInfo]]:
    """Split the sorted files' segments into shards; also return bad files found and the usable files'
    headers, which come from the files or from the `headers` cache for files unchanged since."""
    files = sorted(Path(f) for f in files)
    infos, skipped = scan_headers(files, cfg.strict, headers)
    segment = round(cfg.segment_seconds * sample_rate)
    units = [Unit(file_key(i.path, root), i.path, ch, s) for i in infos for ch in range(i.channels)
             for s in range(num_segments(i.length_at(sample_rate), segment))]
    return [units[a : a + shard_size] for a in range(0, len(units), shard_size)], skipped, infos


def fingerprint(units: Sequence[Unit], settings: dict[str, Any]) -> str:
    """A hash of a shard's work: its units (with file sizes) and every setting that shapes the output."""
    sizes = {u.key: u.path.stat().st_size if u.path.exists() else -1 for u in units}
    work = dict(units=[(u.key, u.channel, u.segment) for u in units], sizes=sizes, settings=settings)
    return hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()[:32]
