"""Where latent shards are read from: a local folder, a folder at any fsspec URL, or an uncompressed tar
(local or at a URL) holding such a folder's files; and the index that lists a folder's shards.

A local folder is memory-mapped (`safetensors.safe_open`). Anything else is read by byte ranges: a
safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the raw C-ordered data, so one row of an [N, ...] tensor is one contiguous
range. In a tar (POSIX ustar or GNU, not compressed) every member's data is contiguous too, at an offset
`tarfile` reports; a shard inside a tar is that range of the tar file. Nothing is downloaded whole.

The index (`index.json`, written by `jat.data.precompute` beside the shards) lists every shard with its
rows, its valid frames and its bytes, and the shape shared by all rows. With it a dataset opens no shard
until it reads one of its rows; without it (folders from before the index existed) every shard's
header is read at start.
"""

from __future__ import annotations

import json
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from jat.codecs.norm import LatentNorm

INDEX = "index.json"
INDEX_FORMAT = "jat-index-1"
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "F64": torch.float64, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "U8": torch.uint8, "I8": torch.int8}


class ShardError(ValueError):
    """A latent shard folder that is missing, empty or holds a corrupt shard (named in the message)."""


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


class _LocalShard:
    """A memory-mapped local shard."""

    def __init__(self, path: str):
        self.name = path
        try:
            self._f = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ShardError(f"{path}: corrupt or unreadable latent shard: {exc}") from None

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, key: str) -> list[int]:
        return list(self._f.get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)

    def row(self, key: str, r: int) -> torch.Tensor:
        try:
            return self._f.get_slice(key)[r]  # [...]
        except SafetensorError as exc:
            raise ShardError(f"{self.name}: corrupt latent shard: {exc}") from None

    def metadata(self) -> dict[str, str]:
        return self._f.metadata() or {}


class _RangeShard:
    """A safetensors file read by byte ranges from an fsspec file at `offset` (0, or a tar member's)."""

    def __init__(self, fs: Any, path: str, offset: int = 0, size: int | None = None, name: str | None = None):
        self.fs, self.path, self.offset, self.name = fs, path, offset, name or path
        try:
            head = self._read(0, 8)
            (n,) = struct.unpack("<Q", head)
            if size is not None and 8 + n > size:
                raise ValueError("header past the end of the file")
            header = json.loads(self._read(8, 8 + n))
        except (ValueError, struct.error, OSError) as exc:
            raise ShardError(f"{self.name}: corrupt or unreadable latent shard: {exc}") from None
        self._meta = header.pop("__metadata__", None) or {}
        self._data = 8 + n
        self._header = header

    def _read(self, a: int, b: int) -> bytes:
        data = self.fs.cat_file(self.path, start=self.offset + a, end=self.offset + b)
        if len(data) != b - a:
            raise OSError(f"short read ({len(data)} of {b - a} bytes)")
        return data

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> list[int]:
        return list(self._header[key]["shape"])

    def _get(self, key: str, first: int, count: int | None) -> torch.Tensor:
        entry = self._header[key]
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
        start, stop = entry["data_offsets"]
        if count is not None:  # rows [first, first + count) of the leading dimension
            row = (stop - start) // max(shape[0], 1)
            start, stop, shape = start + first * row, start + (first + count) * row, [count, *shape[1:]]
        try:
            raw = self._read(self._data + start, self._data + stop)
        except OSError as exc:
            raise ShardError(f"{self.name}: corrupt latent shard: {exc}") from None
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)

    def tensor(self, key: str) -> torch.Tensor:
        return self._get(key, 0, None)

    def row(self, key: str, r: int) -> torch.Tensor:
        return self._get(key, r, 1)[0]

    def metadata(self) -> dict[str, str]:
        return self._meta


class ShardSource:
    """The files of one shard folder: `root` is a local folder, an fsspec URL of a folder, or a `.tar`
    file (local path or URL) of the folder's files. Picklable (to DataLoader workers): the filesystem
    and the tar's member table are rebuilt on first use."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.tar = self.root.endswith(".tar")
        self.local = not is_url(root) and not self.tar
        self._fs: Any = None
        self._members: dict[str, tuple[int, int]] | None = None  # tar: name -> (offset, size)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None:
            try:
                import fsspec
            except ImportError:
                raise ShardError(f"{self.root}: reading shards from a URL or a tar needs fsspec "
                                 "(pip install fsspec)") from None
            self._fs, self._path = fsspec.core.url_to_fs(self.root)
        return self._fs, self._path

    def _tar_members(self) -> dict[str, tuple[int, int]]:
        if self._members is None:
            fs, path = self._filesystem()
            try:
                with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    self._members = {Path(m.name).name: (m.offset_data, m.size) for m in tar if m.isfile()}
            except (OSError, tarfile.TarError) as exc:
                raise ShardError(f"{self.root}: not a readable uncompressed tar of shards: {exc}") from None
        return self._members

    def exists(self) -> bool:
        if self.local:
            return Path(self.root).is_dir()
        fs, path = self._filesystem()
        return fs.isfile(path) if self.tar else fs.isdir(path)

    def names(self, pattern: str) -> list[str]:
        """File names in the folder matching a glob `pattern`, sorted."""
        if self.local:
            return sorted(p.name for p in Path(self.root).glob(pattern))
        if self.tar:
            return sorted(n for n in self._tar_members() if Path(n).match(pattern))
        fs, path = self._filesystem()
        return sorted(Path(p).name for p in fs.glob(f"{path.rstrip('/')}/{pattern}"))

    def read_bytes(self, name: str) -> bytes | None:
        """A small file of the folder (index.json, meta.json, stats) whole; None when absent."""
        if self.local:
            p = Path(self.root) / name
            return p.read_bytes() if p.is_file() else None
        fs, path = self._filesystem()
        if self.tar:
            member = self._tar_members().get(name)
            if member is None:
                return None
            return fs.cat_file(path, start=member[0], end=member[0] + member[1])
        target = f"{path.rstrip('/')}/{name}"
        return fs.cat_file(target) if fs.isfile(target) else None

    def read_text(self, name: str) -> str | None:
        data = self.read_bytes(name)
        return None if data is None else data.decode()

    def latent_norm(self, name: str = "stats.safetensors") -> LatentNorm:
        """The folder's latent statistics (`LatentNorm.load` of `name`)."""
        if self.local:
            return LatentNorm.load(Path(self.root) / name)
        data = self.read_bytes(name)
        if data is None:
            raise ShardError(f"{self.where(name)}: no latent statistics; rerun the pre-encoding to merge")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(data)
            return LatentNorm.load(Path(tmp) / name)

    def where(self, name: str) -> str:
        return f"{self.root}:{name}" if self.tar else f"{self.root.rstrip('/')}/{name}"

    def open(self, name: str) -> _LocalShard | _RangeShard:
        """An open shard: keys(), shape(key), tensor(key), row(key, r), metadata()."""
        if self.local:
            return _LocalShard(str(Path(self.root) / name))
        fs, path = self._filesystem()
        if self.tar:
            if name not in self._tar_members():
                raise ShardError(f"{self.where(name)}: no such shard in the tar")
            offset, size = self._tar_members()[name]
            return _RangeShard(fs, path, offset, size, name=self.where(name))
        return _RangeShard(fs, f"{path.rstrip('/')}/{name}", name=self.where(name))

    def index(self) -> dict[str, Any] | None:
        """The folder's index (see the module docstring), or None for a folder without one."""
        text = self.read_text(INDEX)
        if text is None:
            return None
        index = json.loads(text)
        if index.get("format") != INDEX_FORMAT:
            raise ShardError(f"{self.where(INDEX)}: unknown index format {index.get('format')!r}")
        return index
