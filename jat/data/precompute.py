"""Pre-encode audio into latent shards (format: see `jat.data.datasets`) so training never runs the codec.

The work plan (`jat.data.plan`) is a pure function of the sorted file list and the settings: units
(file, channel, segment) fill shards of `shard_size` in order. Each shard records a fingerprint of
its units and settings, so a rerun keeps the shards that match and redoes only the others, and
several processes can each encode a part of the shards (`precompute(part=...)`). Shards
are written atomically (`jat.atomic.write_atomic`): a killed run never leaves half a shard, and the
temporary file it leaves is removed by the next run (`jat.atomic.remove_stale_temps`).

Randomness: LR version k of a unit uses `example_rng(seed, crc32(file), channel, segment, k)`, so
the same seed gives identical shards and adding files does not change the others' degradations.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain, groupby
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from jat.atomic import remove_stale_temps, write_atomic
from jat.codecs.base import HOP, SAMPLE_RATE, Codec
from jat.codecs.norm import LatentNorm, LatentStats
from jat.config import DataConfig
from jat.data.audio import AudioError, load_audio
from jat.data.datasets import (
    SHARD_FORMAT,
    SHARD_GLOB,
    as_numpy,
    at_reference_level,
    example_rng,
    record_bad,
    shard_layout,
    shard_metadata,
)
from jat.data.degrade import EXTRA_STAGE_KEYS, simulate_lowres
from jat.data.plan import (  # noqa: F401 (cache_headers and plan_shards are the pre-encoding's API too)
    HEADERS,
    Unit,
    cache_headers,
    fingerprint,
    plan_shards,
    save_headers,
)
from jat.data.shards import INDEX, INDEX_FORMAT

log = logging.getLogger(__name__)

CACHES = ("auto", "latents", "codes", "codes-hr")  # what a shard stores of the latents (`encode_shard`)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_done(path: Path, plan: str) -> bool:
    """Whether `path` is a readable shard written for exactly this work."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            complete = shard_layout(keys) is not None and {"moments_hr", "moments_lr"} <= keys
            return complete and shard_metadata(f).get("plan") == plan
    except (SafetensorError, OSError, ValueError):
        return False


@dataclass
class Row:
    """A prepared unit: the HR segment and its K LR versions, right-padded, before encoding."""

    unit: Unit
    hr: np.ndarray  # [seg]
    lr: np.ndarray  # [K, seg]
    valid: int  # real samples; the rest is padding
    degradations: list  # K x Degradation.record(): [cutoff, family, order(, {extra stages})]


def prepare_file(path: Path, units: Sequence[Unit], cfg: DataConfig, versions: int, seed: int,
                 sample_rate: int) -> list[Row]:
    """Load one file, then cut and degrade its units (no shared state: runs in worker processes).

    Raises AudioError for a bad file.
    """
    segment = round(cfg.segment_seconds * sample_rate)
    audio = as_numpy(load_audio(path, target_sr=sample_rate))  # [channels, L]
    rows = []
    for u in units:
        x = audio[min(u.channel, audio.shape[0] - 1), u.segment * segment : (u.segment + 1) * segment]  # [n]
        if x.size == 0:  # the header over-estimated the length by a segment's worth: nothing here
            continue
        x = at_reference_level(x)  # [n]
        hr, lr, degs = np.zeros(segment, np.float32), np.zeros((versions, segment), np.float32), []
        hr[: x.size] = x
        for k in range(versions):
            rng = example_rng(seed, zlib.crc32(u.key.encode()), u.channel, u.segment, k)
            y, deg = simulate_lowres(x[None], sample_rate, rng, cfg)  # [1, n]
            lr[k, : x.size] = as_numpy(y).reshape(-1)
            degs.append(deg.record())
        rows.append(Row(u, hr, lr, x.size, degs))
    return rows


def _worker_init() -> None:
    torch.set_num_threads(1)  # the pool provides the parallelism


def _prepare_here(*args: Any) -> list[Row]:
    """`prepare_file` in this process, with one torch thread like a worker, so that float results
    (thread-dependent summation order) and thus the shards do not depend on `workers`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return prepare_file(*args)
    finally:
        torch.set_num_threads(threads)


def encode_shard(units: Sequence[Unit], codec: Codec, cfg: DataConfig, versions: int, seed: int,
                 skipped: dict[str, str], batch_size: int = 16, dtype: torch.dtype = torch.float16,
                 progress: Callable[[int], None] | None = None,
                 pool: Executor | None = None, cache: str = "latents"
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Load, segment, degrade and encode one shard's units; returns (tensors, metadata fields).

    Files are prepared in `pool` when given (results are used in order, so the output does not
    depend on it). Each codec call encodes about `batch_size` segments, HR and LR together. The
    tensors include `moments_hr` / `moments_lr` [3, C] float64 (count, mean, sum of squared
    deviations over valid frames of the stored values) so stats need no second pass. `cache`
    (CACHES): "codes" stores the quantizer codes of HR and LR (int16), "codes-hr" those of HR and LR
    latents in `dtype`; the moments are then those of the latents rebuilt from the codes (float32).
    """
    sr, segment = codec.sample_rate, round(cfg.segment_seconds * codec.sample_rate)
    device = next(chain(codec.parameters(), codec.buffers()), torch.zeros(0)).device
    c, t = codec.latent_dim, codec.num_frames(segment)
    q = getattr(codec, "n_codebooks", 0)
    stats_hr, stats_lr = LatentStats(c), LatentStats(c)
    out: dict[str, list[torch.Tensor]] = {"hr": [], "lr": []}
    rows, batch = [], []
    store = dict(hr=cache != "latents", lr=cache == "codes")  # which parts are stored as codes

    def flush() -> None:
        if not batch:
            return
        audio = np.concatenate([np.stack([r.hr for r in batch]), np.concatenate([r.lr for r in batch])])
        x = torch.from_numpy(audio)[:, None].to(device)  # [B*(K+1), 1, seg]
        with torch.no_grad():
            codes = codec.encode_codes(x) if cache != "latents" else None  # [B*(K+1), Q, T]
            z = codec.from_codes(codes) if codes is not None else codec.encode(x)  # [B*(K+1), C, T]
        z = z.float().cpu()
        if not torch.isfinite(z).all() or z.abs().max() > torch.finfo(dtype).max:
            raise ValueError(f"latents are not finite or overflow {dtype}; store them as float32")
        n = len(batch)
        valid = torch.tensor([codec.num_frames(r.valid) for r in batch])  # [B]
        mask = torch.arange(t)[None] < valid[:, None]  # [B, T]
        for part, sl, shape, stats, m in (("hr", slice(0, n), (n, c, t), stats_hr, mask),
                                         ("lr", slice(n, None), (n, versions, c, t), stats_lr,
                                          mask.repeat_interleave(versions, 0))):
            if store[part]:
                stored = codes[sl].to(torch.int16).cpu().reshape(*shape[:-2], q, t)  # [B(, K), Q, T]
                value = z[sl]  # rebuilt from the codes: exactly what training sees
            else:
                stored = z[sl].to(dtype).reshape(shape)  # [B(, K), C, T]
                value = stored.float().reshape(-1, c, t)
            stats.update(value.reshape(-1, c, t), m)
            out[part].append(stored)
        rows.extend(batch)
        batch.clear()

    groups = [(path, list(g)) for path, g in groupby(units, key=lambda u: u.path)]
    args = (cfg, versions, seed, sr)
    jobs = [pool.submit(prepare_file, p, g, *args) for p, g in groups] if pool else [None] * len(groups)
    for (path, group), job in zip(groups, jobs, strict=True):
        try:
            prepared = job.result() if job else _prepare_here(path, group, *args)
        except AudioError as exc:
            record_bad(skipped, path, exc, cfg.strict)
            prepared = []
        for row in prepared:
            batch.append(row)
            if len(batch) * (versions + 1) >= batch_size:
                flush()
        if progress:
            progress(len(group))
    flush()
    moments = [torch.stack([torch.full((c,), float(s.count), dtype=torch.float64), s.mean, s.m2])
               for s in (stats_hr, stats_lr)]  # [3, C] each
    tensors = {}
    for part, lead in (("hr", ()), ("lr", (versions,))):
        empty = torch.zeros(0, *lead, q, t, dtype=torch.int16) if store[part] else \
            torch.zeros(0, *lead, c, t, dtype=dtype)
        key = f"{part}_codes" if store[part] else part
        tensors[key] = torch.cat(out[part]) if out[part] else empty  # [N(, K), C or Q, T]
    tensors.update(
        frames=torch.tensor([codec.num_frames(r.valid) for r in rows], dtype=torch.int32).reshape(-1),  # [N]
        cutoff=torch.tensor([[d[0] for d in r.degradations] for r in rows], dtype=torch.float32
                            ).reshape(-1, versions),  # [N, K]
        moments_hr=moments[0],  # [3, C]
        moments_lr=moments[1],  # [3, C]
    )
    fields = dict(sources=[[r.unit.key, r.unit.channel, r.unit.segment] for r in rows],
                  degradations=[r.degradations for r in rows])
    return tensors, fields


def merge_moments(moments: Sequence[torch.Tensor], channels: int) -> LatentNorm:
    """Pool per-shard [3, C] (count, mean, m2) moments (Chan et al.'s merge) into a LatentNorm."""
    stats = LatentStats(channels)
    for m in moments:
        stats.merge(int(m[0, 0]), m[1], m[2])
    return stats.finalize()


def resolve_cache(cache: str, codec: Codec) -> str:
    """The CACHES entry `cache` means for `codec`: "auto" is "codes" where the codec has codes (DAC),
    else "latents"; asking a codec without codes for them is an error."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    has_codes = hasattr(codec, "encode_codes")
    if cache == "auto":
        return "codes" if has_codes else "latents"
    if cache != "latents" and not has_codes:
        raise ValueError(f"cache={cache!r}: the {type(codec).__name__} codec has no quantizer codes; "
                         "use cache=latents")
    return cache


def precompute(files: Sequence[str | Path], out_dir: str | Path, codec: Codec, cfg: DataConfig, *,
               versions: int | None = None, shard_size: int = 128, seed: int = 0, batch_size: int = 16,
               dtype: str = "float16", workers: int = 0, data_root: str | Path | None = None,
               codec_config: dict | None = None, progress: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None, cache: str = "latents",
               part: tuple[int, int] = (0, 1)) -> dict[str, Any] | None:
    """Encode `files` into shards under `out_dir` (resumable), then write stats, meta.json and index.json.

    `workers` > 0 loads and degrades audio in that many processes (the output is the same).
    `data_root`: files under it are stored by relative path (which also seeds their degradations).
    `cache` (CACHES, see `encode_shard`): what is stored of the latents. `part=(i, n)`: encode only the
    shards j with j % n == i (one of n processes, possibly on other machines, sharing `out_dir`) and
    return None; the plan, and so every shard's bytes, does not depend on n. Once all n parts are done,
    a run with the default part (0, 1) finds every shard done and writes the merged statistics, meta
    and index, which then equal a one-process run's bit for bit. The file headers are cached in
    `out_dir/headers.json` when a run or part ends (or up front, `cache_headers`): later runs and
    parts read only new or changed files' headers.
    `on_plan(total)` is called once with the segments planned for this part, `progress(n)` as n more
    segments are done (shards finished by an earlier run count at once). Returns the meta dict, whose
    "skipped" maps every bad file to its reason; with `cfg.strict` the first bad file raises.
    """
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    versions = versions or cfg.versions
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cache = resolve_cache(cache, codec)
    root = Path(data_root) if data_root is not None else None
    plan, skipped, infos = plan_shards(files, cfg, codec.sample_rate, shard_size, root, headers=out / HEADERS)
    if not plan:
        raise AudioError(f"no usable audio among {len(files)} files (skipped: {skipped})")
    mine = range(index, len(plan), count)
    if on_plan:
        on_plan(sum(len(plan[j]) for j in mine))
    lr_keys = ("segment_seconds", "cutoff_min", "cutoff_max", "filters", "order_min", "order_max")
    # the real-input stages' settings only where they differ from the defaults (which add nothing), so
    # shards made before these settings existed keep their fingerprints
    defaults = asdict(DataConfig())
    data = {k: v for k, v in asdict(cfg).items()
            if k in lr_keys or (k in EXTRA_STAGE_KEYS and v != defaults[k])}
    settings = dict(format=SHARD_FORMAT, codec=codec_config or type(codec).__name__, hop=codec.hop,
                    sample_rate=codec.sample_rate, latent_dim=codec.latent_dim, versions=versions, seed=seed,
                    dtype=dtype, data=data)
    if cache != "latents":  # only then: latent shards keep the fingerprints they had before codes existed
        settings.update(cache=cache, n_codebooks=codec.n_codebooks, codebook_size=codec.codebook_size)
    names = [out / f"shard-{j:05d}.safetensors" for j in range(len(plan))]
    (out / INDEX).unlink(missing_ok=True)  # rewritten by the merge, once every shard is done
    for stale in sorted(set(out.glob(SHARD_GLOB)) - set(names)):  # left from a larger earlier plan
        log.info("removing stale shard %s", stale)
        stale.unlink(missing_ok=True)
    spawn = get_context("spawn")  # fork is unsafe once torch has started its thread pools
    pool = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_worker_init) if workers else None
    try:
        for j in mine:
            units, path = plan[j], names[j]
            plan_id = fingerprint(units, settings)
            if shard_done(path, plan_id):
                log.info("%s is done, keeping it", path.name)
                if progress:
                    progress(len(units))
                continue
            shard_skipped: dict[str, str] = {}
            tensors, fields = encode_shard(units, codec, cfg, versions, seed, shard_skipped, batch_size,
                                           DTYPES[dtype], progress, pool, cache)
            info = dict(settings, plan=plan_id, skipped=shard_skipped, **fields)
            metadata = {"jat": json.dumps(info, sort_keys=True)}  # one key: deterministic file bytes
            remove_stale_temps(path)  # a killed run's half-written shard
            write_atomic(path, lambda tmp, t=tensors, m=metadata: save_file(t, str(tmp), metadata=m))
            log.info("wrote %s (%d rows)", path.name, len(tensors["frames"]))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    save_headers(out / HEADERS, infos)  # once this part is done: an interrupted run leaves only shards
    if count > 1:
        return None
    return merge(out, names, settings, skipped, cfg, codec, len(files))


def merge(out: Path, names: Sequence[Path], settings: dict[str, Any], skipped: dict[str, str],
          cfg: DataConfig, codec: Codec, n_files: int) -> dict[str, Any]:
    """Pool the finished shards' moments into the statistics (in shard order, so the same bits however
    many processes wrote the shards) and write stats, meta.json and index.json; returns the meta."""
    counts, sources, moments, entries = {}, set(), {"hr": [], "lr": []}, []
    frames = 0
    for path in names:
        with safe_open(str(path), framework="pt") as f:
            rows = f.get_slice("frames").get_shape()[0]
            counts[path.name] = rows
            valid = int(f.get_tensor("frames").long().sum())
            frames += valid
            info = shard_metadata(f)
            skipped.update(info.get("skipped", {}))
            sources.update(row[0] for row in info.get("sources", []))
            for k in moments:
                moments[k].append(f.get_tensor(f"moments_{k}"))
        entries.append(dict(name=path.name, rows=rows, frames=valid, bytes=path.stat().st_size))
    if not sum(counts.values()):
        raise AudioError(f"no usable audio among {n_files} files (skipped: {skipped})")
    for k, name in (("hr", "stats.safetensors"), ("lr", "stats_lr.safetensors")):
        norm = merge_moments(moments[k], codec.latent_dim)
        write_atomic(out / name, lambda tmp, n=norm: n.save(tmp))
    segment = round(cfg.segment_seconds * codec.sample_rate)
    hours = frames / codec.frame_rate / 3600  # of mono audio: valid HR frames
    total = sum(e["bytes"] for e in entries)
    meta = dict(settings, segment_samples=segment, frames_per_segment=codec.num_frames(segment),
                shards=counts, rows=sum(counts.values()), files=len(sources),
                skipped=dict(sorted(skipped.items())), bytes=total, hours=hours,
                bytes_per_hour=round(total / hours))
    log.info("%d shards, %.3g GB, %.4g h of audio: %.4g MB per hour (HR + %d LR versions)", len(entries),
             total / 1e9, hours, total / hours / 1e6, settings["versions"])
    write_atomic(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    index = dict(format=INDEX_FORMAT, versions=settings["versions"], latent_dim=codec.latent_dim,
                 frames=codec.num_frames(segment), cache=settings.get("cache", "latents"), shards=entries)
    write_atomic(out / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return meta


def bytes_per_hour(cache: str, versions: int, latent_dim: int, n_codebooks: int = 0, dtype_bytes: int = 2,
                   frame_rate: float = SAMPLE_RATE / HOP) -> float:
    """Bytes of stored rows per hour of mono audio (HR + `versions` LR versions), padding and headers
    aside: latents take latent_dim x dtype_bytes per frame, codes n_codebooks x 2 (int16) per frame."""
    latent, codes = latent_dim * dtype_bytes, n_codebooks * 2
    per_frame = {"latents": (1 + versions) * latent, "codes": (1 + versions) * codes,
                 "codes-hr": codes + versions * latent}[cache]
    return per_frame * frame_rate * 3600
