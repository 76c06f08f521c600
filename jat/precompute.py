"""Pre-encode audio into latent shards (format: see `jat.data`) so training never runs the codec.

The work plan is a pure function of the sorted file list and the settings: every file's channels are
cut into fixed segments (the last one right-padded, a whole short clip padded; a tail shorter than
`MIN_TAIL` of a segment is dropped when the file has other segments), and the resulting units
(file, channel, segment) fill shards of `shard_size` in order. Each shard records a fingerprint of
its units and settings, so a rerun keeps the shards that match and redoes only the others. Shards
are written to a temporary name and `os.replace`d: a killed run never leaves half a shard.

Randomness: LR version k of a unit uses `example_rng(seed, crc32(file), channel, segment, k)`, so
the same seed gives identical shards and adding files does not change the others' degradations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from jat.audio import AudioError, load_audio
from jat.codecs.base import Codec
from jat.codecs.norm import LatentStats
from jat.config import DataConfig
from jat.data import SHARD_FORMAT, SHARD_GLOB, as_numpy, example_rng, record_bad, scan_audio_files
from jat.degrade import simulate_lowres

log = logging.getLogger(__name__)

MIN_TAIL = 0.25  # fraction of a segment the last piece of a longer file must reach to be kept
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def plan_shards(files: Sequence[str | Path], cfg: DataConfig, sample_rate: int, shard_size: int,
                root: Path | None = None) -> tuple[list[list[Unit]], dict[str, str]]:
    """Scan headers and split the sorted files' segments into shards; also return bad files found."""
    files = sorted(Path(f) for f in files)
    infos, skipped = scan_audio_files(files, sample_rate, cfg.strict)
    segment = round(cfg.segment_seconds * sample_rate)
    units = [Unit(file_key(i.path, root), i.path, ch, s)
             for i in infos for ch in range(i.channels) for s in range(num_segments(i.length, segment))]
    return [units[a : a + shard_size] for a in range(0, len(units), shard_size)], skipped


def fingerprint(units: Sequence[Unit], settings: dict[str, Any]) -> str:
    """A hash of a shard's work: its units (with file sizes) and every setting that shapes the output."""
    sizes = {u.key: u.path.stat().st_size if u.path.exists() else -1 for u in units}
    work = dict(units=[(u.key, u.channel, u.segment) for u in units], sizes=sizes, settings=settings)
    return hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()[:32]


def shard_done(path: Path, plan: str) -> bool:
    """Whether `path` is a readable shard written for exactly this work."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("plan") == plan
    except (SafetensorError, OSError):
        return False


def encode_shard(units: Sequence[Unit], codec: Codec, cfg: DataConfig, versions: int, seed: int,
                 skipped: dict[str, str], batch_size: int = 16, dtype: torch.dtype = torch.float16,
                 progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load, segment, degrade and encode one shard's units; returns (tensors, metadata fields)."""
    sr, segment = codec.sample_rate, round(cfg.segment_seconds * codec.sample_rate)
    device = next((b.device for b in codec.buffers()), torch.device("cpu"))
    hr_out, lr_out, frames, cutoffs, sources, degradations = [], [], [], [], [], []
    batch: list[tuple[np.ndarray, list[np.ndarray]]] = []  # (hr [seg], K x lr [seg])

    def flush() -> None:
        if not batch:
            return
        hr = torch.from_numpy(np.stack([b[0] for b in batch]))[:, None].to(device)  # [B, 1, seg]
        lr = torch.from_numpy(np.stack([x for b in batch for x in b[1]]))[:, None].to(device)  # [B*K, 1, seg]
        with torch.no_grad():
            z_hr = codec.encode(hr).float()  # [B, C, T]
            z_lr = codec.encode(lr).float()  # [B*K, C, T]
        for z in (z_hr, z_lr):
            if not torch.isfinite(z).all() or z.abs().max() > torch.finfo(dtype).max:
                raise ValueError(f"latents are not finite or overflow {dtype}; store them as float32")
        hr_out.append(z_hr.to(dtype).cpu())
        lr_out.append(z_lr.reshape(len(batch), versions, *z_lr.shape[1:]).to(dtype).cpu())  # [B, K, C, T]
        if progress:
            progress(len(batch))
        batch.clear()

    for path, group in groupby(units, key=lambda u: u.path):
        group = list(group)
        try:
            audio = as_numpy(load_audio(path, target_sr=sr))  # [channels, L]
        except AudioError as exc:
            record_bad(skipped, path, exc, cfg.strict)
            if progress:
                progress(len(group))
            continue
        for u in group:
            x = audio[min(u.channel, audio.shape[0] - 1), u.segment * segment : (u.segment + 1) * segment]
            if x.size == 0:  # the header over-estimated the length by a segment's worth: nothing here
                continue
            hr = np.zeros(segment, np.float32)
            hr[: x.size] = x
            lrs, degs = [], []
            for k in range(versions):
                rng = example_rng(seed, zlib.crc32(u.key.encode()), u.channel, u.segment, k)
                lr, deg = simulate_lowres(x[None], sr, rng, cfg)  # [1, n]
                lrs.append(np.zeros(segment, np.float32))
                lrs[-1][: x.size] = as_numpy(lr).reshape(-1)[: x.size]
                degs.append([float(deg.cutoff), str(deg.family), int(deg.order)])
            batch.append((hr, lrs))
            frames.append(codec.num_frames(x.size))
            cutoffs.append([d[0] for d in degs])
            sources.append([u.key, u.channel, u.segment])
            degradations.append(degs)
            if len(batch) == batch_size:
                flush()
    flush()
    c, t = codec.latent_dim, codec.num_frames(segment)
    tensors = dict(
        hr=torch.cat(hr_out) if hr_out else torch.zeros(0, c, t, dtype=dtype),  # [N, C, T]
        lr=torch.cat(lr_out) if lr_out else torch.zeros(0, versions, c, t, dtype=dtype),  # [N, K, C, T]
        frames=torch.tensor(frames, dtype=torch.int32).reshape(-1),  # [N]
        cutoff=torch.tensor(cutoffs, dtype=torch.float32).reshape(-1, versions),  # [N, K]
    )
    return tensors, dict(sources=sources, degradations=degradations)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via `write(tmp)` then rename over `path`, so readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def compute_stats(shards: Sequence[Path], rows_per_step: int = 16):
    """(HR, LR) LatentNorms over the valid frames of the shards' latents, as stored."""
    hr_stats, lr_stats = LatentStats(), LatentStats()
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            n, k, c, t = f.get_slice("lr").get_shape()
            frames = f.get_tensor("frames").long()  # [N]
            for a in range(0, n, rows_per_step):
                b = min(a + rows_per_step, n)
                mask = torch.arange(t)[None] < frames[a:b, None]  # [n, T]
                hr_stats.update(f.get_slice("hr")[a:b].float(), mask)  # [n, C, T]
                lr = f.get_slice("lr")[a:b].float().reshape(-1, c, t)  # [n*K, C, T]
                lr_stats.update(lr, mask.repeat_interleave(k, dim=0))  # mask [n*K, T]
    return hr_stats.finalize(), lr_stats.finalize()


def precompute(files: Sequence[str | Path], out_dir: str | Path, codec: Codec, cfg: DataConfig, *,
               versions: int | None = None, shard_size: int = 128, seed: int = 0, batch_size: int = 16,
               dtype: str = "float16", data_root: str | Path | None = None, codec_config: dict | None = None,
               progress: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode `files` into shards under `out_dir` (resumable), then write stats and meta.json.

    `on_plan(total)` is called once with the planned segment count, `progress(n)` as n more segments
    are done (shards finished by an earlier run count at once). Returns
    the meta dict, whose "skipped" maps every bad file to its reason. `cfg.strict` raises instead.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    versions = versions or cfg.versions
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    root = Path(data_root) if data_root is not None else None
    plan, skipped = plan_shards(files, cfg, codec.sample_rate, shard_size, root)
    if not plan:
        raise AudioError(f"no usable audio among {len(files)} files (skipped: {skipped})")
    if on_plan:
        on_plan(sum(len(units) for units in plan))
    settings = dict(format=SHARD_FORMAT, codec=codec_config or type(codec).__name__, hop=codec.hop,
                    sample_rate=codec.sample_rate, latent_dim=codec.latent_dim, versions=versions, seed=seed,
                    dtype=dtype, data={k: v for k, v in asdict(cfg).items()
                                       if k in ("segment_seconds", "cutoff_min", "cutoff_max", "filters",
                                                "order_min", "order_max")})
    names = [out / f"shard-{j:05d}.safetensors" for j in range(len(plan))]
    for stale in sorted(set(out.glob(SHARD_GLOB)) - set(names)):  # left from a larger earlier plan
        log.info("removing stale shard %s", stale)
        stale.unlink()
    for units, path in zip(plan, names, strict=True):
        plan_id = fingerprint(units, settings)
        if shard_done(path, plan_id):
            log.info("%s is done, keeping it", path.name)
            if progress:
                progress(len(units))
            continue
        shard_skipped: dict[str, str] = {}
        tensors, fields = encode_shard(units, codec, cfg, versions, seed, shard_skipped, batch_size,
                                       DTYPES[dtype], progress)
        metadata = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in settings.items()}
        metadata.update(plan=plan_id, sources=json.dumps(fields["sources"]),
                        degradations=json.dumps(fields["degradations"]), skipped=json.dumps(shard_skipped))
        write_atomic(path, lambda tmp, t=tensors, m=metadata: save_file(t, str(tmp), metadata=m))
        log.info("wrote %s (%d rows)", path.name, len(tensors["hr"]))

    counts, sources = {}, set()
    for path in names:
        with safe_open(str(path), framework="pt") as f:
            counts[path.name] = f.get_slice("frames").get_shape()[0]
            skipped.update(json.loads((f.metadata() or {}).get("skipped", "{}")))
            sources.update(row[0] for row in json.loads((f.metadata() or {}).get("sources", "[]")))
    if not sum(counts.values()):
        raise AudioError(f"no usable audio among {len(files)} files (skipped: {skipped})")
    hr_norm, lr_norm = compute_stats([p for p in names if counts[p.name]])
    hr_norm.save(out / "stats.safetensors")
    lr_norm.save(out / "stats_lr.safetensors")
    meta = dict(settings, segment_samples=round(cfg.segment_seconds * codec.sample_rate),
                frames_per_segment=codec.num_frames(round(cfg.segment_seconds * codec.sample_rate)),
                shards=counts, rows=sum(counts.values()), files=len(sources),
                skipped=dict(sorted(skipped.items())))
    write_atomic(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return meta
