"""Datasets: raw-audio segments with fresh LR simulation, and pre-encoded latent shards.

Examples are mono: every channel of a file is a separate signal (a random channel per example in
`AudioSegmentDataset`, every channel in its own rows when pre-encoding), matching inference, which
processes channels as a batch. Mixing channels down could cancel out-of-phase content.

Randomness is a function of (seed, epoch, index) only (`example_rng`), so a resumed run that calls
`set_epoch` sees the same data, whatever the worker count.

Latent shard format (written by `jat.data.precompute`, read by `LatentShardDataset`), in one folder:

  shard-00000.safetensors, shard-00001.safetensors, ...   N rows each (N may differ, even be 0)
    hr      [N, C, T]     float16   HR latents of N fixed-length segments (T = num_frames(segment))
    lr      [N, K, C, T]  float16   LR latents of K degraded versions of each segment
    frames  [N]           int32     valid frames of each row; frames after that are padding
    cutoff  [N, K]        float32   Hz, low-pass cutoff of each LR version
    moments_hr, moments_lr  [3, C]  float64  count, mean and sum of squared deviations of the
                                    stored latents over valid frames (merged into the stats)
    a codes cache (`cache` "codes" or "codes-hr" in the metadata, DAC) holds instead of hr, and of
    lr with "codes", the quantizer's codes, rebuilt into latents by `from_codes` on the device:
    hr_codes [N, Q, T]     int16     Q codebooks' entries per frame
    lr_codes [N, K, Q, T]  int16
    metadata: one key, "jat", a JSON object (one key keeps the file bytes deterministic) with
      format, plan (fingerprint of the shard's work), codec, hop, sample_rate, latent_dim, versions,
      seed, dtype, data (segment_seconds and the LR simulation settings), sources ([file, channel,
      segment] per row), degradations (K `Degradation.record()` lists per row: [cutoff, family, order],
      plus a dict of the real-input stages when any were drawn; older shards hold only the three),
      skipped ({file: reason})
  stats.safetensors      LatentNorm of the HR latents over valid frames (used for x and c alike)
  stats_lr.safetensors   LatentNorm of the LR latents (for inspection)
  meta.json              codec and data config, shard list and row counts, skipped files,
                         bytes per hour of audio
  index.json             every shard's name, rows, valid frames and bytes, and the row shape
                         (`jat.data.shards`): readers open a shard only when they read from it

float16 halves the size of float32 and keeps ~3 significant digits; precompute refuses latents that
overflow it (choose float32 or bfloat16 then). The shard's `dtype` metadata says what was stored.
The items of `LatentShardDataset` are the rows of the shards in name order. Folders written before
the codes cache and the index existed hold only hr/lr and no index.json; they load as before.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from jat.codecs.base import SAMPLE_RATE
from jat.config import DataConfig
from jat.data.audio import (
    RESAMPLE_WIDTH,
    AudioError,
    audio_info,
    level_gain,
    list_audio_files,
    read_samples,
    resample,
    resampled_length,
)
from jat.data.degrade import simulate_lowres
from jat.data.shards import INDEX, ShardError, ShardSource

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.safetensors"
SHARD_FORMAT = "jat-latents-2"  # 2: segments at the reference level (`at_reference_level`)
SHARD_KEYS = ("hr", "lr", "frames", "cutoff")
MAX_REDRAWS = 100  # draws of another file before a dataset of bad files gives up


def shard_metadata(handle: Any) -> dict[str, Any]:
    """The "jat" metadata object of an open shard (a `safe_open` or `ShardSource.open` handle); {} when
    absent."""
    return json.loads((handle.metadata() or {}).get("jat", "{}"))


def example_rng(*keys: int) -> np.random.Generator:
    """A generator determined by non-negative integer keys, e.g. (seed, epoch, index)."""
    return np.random.default_rng([int(k) for k in keys])


def at_reference_level(x: np.ndarray) -> np.ndarray:
    """A training segment [n] scaled to the level the upsampler brings its input to (`level_gain`), so
    that the model learns at the level it is used at; digital silence is left as it is."""
    gain = float(level_gain(torch.from_numpy(np.ascontiguousarray(x))[None])[0])
    return (x * np.float32(gain)).astype(np.float32) if gain > 0 else x


def as_numpy(audio: Any) -> np.ndarray:
    """float32 numpy view of audio given as a numpy array or a torch tensor."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    return np.asarray(audio, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# scanning audio files


@dataclass(frozen=True)
class AudioInfo:
    """What the up-front header scan learns about one file."""

    path: Path
    sample_rate: int
    channels: int
    frames: int  # samples per channel at the file's own rate

    def length_at(self, sample_rate: int) -> int:
        """Samples per channel after resampling to `sample_rate` (audio.resample's output length)."""
        return resampled_length(self.frames, self.sample_rate, sample_rate)


def scan_audio_files(
    files: Sequence[str | Path], strict: bool = False
) -> tuple[list[AudioInfo], dict[str, str]]:
    """Read every file's header (cheap); return the usable files and {path: reason} of bad ones.

    Finds missing, unreadable and empty files; silent or NaN files show up only when their samples
    are read. With `strict`, the first bad file raises an AudioError naming it.
    """
    infos: list[AudioInfo] = []
    skipped: dict[str, str] = {}
    for path in map(Path, files):
        try:
            if path.is_file() and path.stat().st_size == 0:
                raise AudioError(f"{path}: file is empty (0 bytes)")
            sr, channels, frames = audio_info(path)
            if frames <= 0 or channels <= 0:
                raise AudioError(f"{path}: audio is empty (0 samples)")
        except AudioError as exc:
            record_bad(skipped, path, exc, strict)
            continue
        infos.append(AudioInfo(path, sr, channels, frames))
    return infos, skipped


def record_bad(skipped: dict[str, str], path: Path, exc: Exception, strict: bool) -> None:
    """Log and record a bad file, or raise at once (naming the file) in strict mode."""
    reason = str(exc).removeprefix(f"{path}: ")  # AudioError messages start with the path
    if strict:
        raise AudioError(f"{path}: {reason}") from exc
    if str(path) not in skipped:
        log.warning("skipping bad audio file %s: %s", path, reason)
    skipped[str(path)] = reason


def read_crop(info: AudioInfo, sample_rate: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop (at most `length` samples at `sample_rate`) of one random channel: float32 [n].

    Only the crop and the resampler's context are read from disk, so long files cost no more than
    short ones. Crops start on the resampler's phase grid (every rate / gcd(rates) samples, 10 ms or
    less for rates that are multiples of 100 Hz), so a crop equals the same stretch of the whole
    file resampled. Raises AudioError for unreadable or non-finite samples, and for a silent file
    when the crop covers all of it.
    """
    src = info.sample_rate
    step_src, step = src // math.gcd(src, sample_rate), sample_rate // math.gcd(src, sample_rate)
    channel = int(rng.integers(info.channels))
    src_len = resampled_length(length, sample_rate, src)  # the crop at the file's rate
    slots = (info.frames - src_len) // step_src + 1 if info.frames > src_len else 1
    start = step_src * int(rng.integers(slots))
    # context for the resampler's kernel (RESAMPLE_WIDTH zero crossings of the lower rate, each
    # side), a whole number of grid steps
    need = 0 if src == sample_rate else 2 * RESAMPLE_WIDTH * -(-src // sample_rate)
    margin = -(-need // step_src) * step_src
    a, b = max(0, start - margin), min(info.frames, start + src_len + margin)
    data, _ = read_samples(info.path, a, b)  # [channels, b-a]; unreadable, empty or non-finite: AudioError
    if a == 0 and b == info.frames and not data.abs().max() > 0:
        raise AudioError(f"{info.path}: audio is silent (all samples are zero)")
    x = resample(data[channel], src, sample_rate)  # [ceil((b-a) * sample_rate / src)]
    offset = (start - a) // step_src * step  # a and start are on the phase grid: exact
    n = min(length, info.length_at(sample_rate) - start // step_src * step)
    return x[offset : offset + n].numpy()  # [n]


# ---------------------------------------------------------------------------------------------
# raw audio segments


class AudioSegmentDataset(Dataset):
    """Random HR segments of audio files with a freshly simulated LR version.

    Each item is dict(hr [1, L], lr [1, L], mask [L] bool, cutoff float) with L = segment_seconds *
    sample_rate. A file contributes about one item per segment it holds (at least one), each a random
    crop of a random channel; files shorter than a segment are right-padded (mask False on padding).

    Bad files are found by a header scan at construction or when read (silent, NaN, ...): they are
    logged, recorded in `skipped` (path -> reason) and another file is drawn; `cfg.strict` raises.
    `skipped` is per process: files found bad inside DataLoader workers are logged there. `set_epoch`
    on this object does not reach persistent DataLoader workers' copies; the trainer's loader sends
    the epoch with every index instead (`jat.train.data.EpochIndexed`).
    """

    def __init__(
        self,
        files: Sequence[str | Path] | str | Path,
        cfg: DataConfig,
        sample_rate: int = SAMPLE_RATE,
        seed: int = 0,
        train: bool = True,
    ):
        if isinstance(files, (str, Path)):
            files = list_audio_files(files)
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.seed = seed
        self.train = train
        self.epoch = 0
        self.segment_samples = round(cfg.segment_seconds * sample_rate)
        self.infos, self.skipped = scan_audio_files(files, cfg.strict)
        if not self.infos:
            raise AudioError(f"no usable audio among {len(files)} files (skipped: {self.skipped})")
        counts = [max(1, round(i.length_at(sample_rate) / self.segment_samples)) for i in self.infos]
        self._ends = np.cumsum(counts)  # item index -> file index by bisection

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch; crops, channels and degradations are a function of (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        epoch = self.epoch if self.train else 0  # validation data is the same every epoch
        file_index = int(np.searchsorted(self._ends, index, side="right"))
        for attempt in range(MAX_REDRAWS):
            # one generator per attempt: the draws do not depend on which files are already known bad
            rng = example_rng(self.seed, epoch, index, attempt)
            if attempt:
                file_index = int(rng.integers(len(self.infos)))
            info = self.infos[file_index]
            if str(info.path) in self.skipped:
                continue
            try:
                x = read_crop(info, self.sample_rate, self.segment_samples, rng)  # [n]
            except AudioError as exc:
                record_bad(self.skipped, info.path, exc, self.cfg.strict)
                continue
            return self._example(x, rng)
        raise AudioError(f"no usable file after {MAX_REDRAWS} draws (skipped: {self.skipped})")

    def _example(self, x: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        seg, n = self.segment_samples, x.shape[-1]
        x = at_reference_level(x)  # [n]
        lr, deg = simulate_lowres(x[None], self.sample_rate, rng, self.cfg)  # [1, n]
        hr_out = torch.zeros(1, seg)  # [1, L]
        lr_out = torch.zeros(1, seg)  # [1, L]
        hr_out[0, :n] = torch.from_numpy(np.ascontiguousarray(x))
        lr_out[0, :n] = torch.from_numpy(np.ascontiguousarray(as_numpy(lr).reshape(-1)))
        mask = torch.arange(seg) < n  # [L]
        return dict(hr=hr_out, lr=lr_out, mask=mask, cutoff=float(deg.cutoff))


# ---------------------------------------------------------------------------------------------
# pre-encoded latent shards


class LatentShardDataset(Dataset):
    """Pre-encoded latents: dict(x [C, T] HR, c [C, T] LR version, mask [T] bool, cutoff float); from a
    codes cache, x_codes [Q, T] int16 in place of x (and c_codes in place of c when the LR versions
    are codes too), which the training batch turns into latents on the device (`from_codes`).

    The LR version k of K, and with `segment_frames` a random crop inside the valid frames (padding
    with mask False when a row is shorter; padded codes are 0), are a function of (seed, epoch, index).
    `root` is a local folder, a folder at an fsspec URL or an uncompressed tar of one
    (`jat.data.shards`). With the folder's index a shard is opened only when one of its rows is read;
    without one (older folders) every shard's header is read here. Only the rows asked for are read.
    """

    def __init__(self, root: str | Path, segment_frames: int | None = None, seed: int = 0):
        if segment_frames is not None and segment_frames < 1:
            raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
        self.root = str(root)
        self.source = ShardSource(root)
        self.segment_frames = segment_frames
        self.seed = seed
        self.epoch = 0
        if not self.source.exists():
            raise ShardError(f"{self.root}: latent folder not found")
        meta = self.source.read_text("meta.json")
        self.meta: dict[str, Any] = json.loads(meta) if meta else {}
        index = self.source.index()
        entries = index["shards"] if index else [dict(name=n) for n in self.source.names(SHARD_GLOB)]
        if not entries:
            raise ShardError(f"{self.root}: no latent shards ({SHARD_GLOB}); make them with "
                             "scripts/precompute_latents.py")
        self.shards = [e["name"] for e in entries]
        self._layout: dict[int, tuple[str, str]] = {}  # shard -> (HR key, LR key), once read
        self._frames: dict[int, torch.Tensor] = {}  # shard -> [N] valid frames, once read
        self._cutoff: dict[int, torch.Tensor] = {}  # shard -> [N, K] Hz, once read
        self._handles: dict[int, Any] = {}
        if index:
            counts = [int(e["rows"]) for e in entries]
            self.versions, self.latent_dim, self.frames = (int(index[k]) for k in ("versions", "latent_dim",
                                                                                   "frames"))
        else:
            counts, shapes = [], set()
            for s in range(len(self.shards)):
                n, shape = self._read_header(s)
                counts.append(n)
                if n:
                    shapes.add(shape)
            if len(shapes) > 1:
                raise ShardError(f"{self.root}: shards disagree on (versions, channels, frames): "
                                 f"{sorted(shapes)}")
            if shapes:
                self.versions, self.latent_dim, self.frames = shapes.pop()
        if not sum(counts):
            raise ShardError(f"{self.root}: the shards hold no rows (every source file was skipped?)")
        self._counts = counts
        self._rows = np.asarray([(s, r) for s, n in enumerate(counts) for r in range(n)],
                                dtype=np.int64)  # [items, 2] (shard, row)

    def _handle(self, s: int) -> Any:
        if s not in self._handles:
            self._handles[s] = self.source.open(self.shards[s])
        return self._handles[s]

    def _read_header(self, s: int) -> tuple[int, tuple[int, int, int]]:
        """Check shard `s`, keep its frames and cutoffs; (rows, (versions, latent channels, frames))."""
        f, where = self._handle(s), self.source.where(self.shards[s])
        keys = set(f.keys())
        layout = shard_layout(keys)
        if layout is None:
            raise ShardError(f"{where}: corrupt latent shard: missing tensors "
                             f"{sorted({'hr', 'lr', 'frames', 'cutoff'} - keys)}")
        hr_key, lr_key = layout
        n, k, *_, t = f.shape(lr_key)
        hr_shape = f.shape(hr_key)
        if hr_shape[0] != n or hr_shape[-1] != t:
            raise ShardError(f"{where}: corrupt latent shard: hr and lr shapes disagree")
        channels = (hr_shape[1] if hr_key == "hr" else f.shape("lr")[2] if lr_key == "lr"
                    else int(shard_metadata(f).get("latent_dim", -1)))  # a codes shard says it
        self._layout[s] = layout
        self._frames[s] = f.tensor("frames").long()
        self._cutoff[s] = f.tensor("cutoff").float()
        return n, (k, channels, t)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to DataLoader workers

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch; LR versions and crops are a function of (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, r = (int(v) for v in self._rows[index])
        if s not in self._layout:  # first row read from this shard (index path): check it against the index
            n, shape = self._read_header(s)
            if n != self._counts[s] or (n and (shape[0] != self.versions or shape[2] != self.frames)):
                raise ShardError(f"{self.source.where(self.shards[s])}: shard does not match {INDEX} "
                                 f"({n} rows, shape {shape}); rerun the pre-encoding to rewrite the index")
        f, (hr_key, lr_key) = self._handle(s), self._layout[s]
        rng = example_rng(self.seed, self.epoch, index)
        k = int(rng.integers(self.versions))
        valid = int(self._frames[s][r])
        length = self.segment_frames or self.frames
        start = int(rng.integers(max(0, valid - length) + 1)) if length < self.frames else 0
        stop = min(start + length, self.frames)
        x = f.row(hr_key, r)[..., start:stop]  # [C or Q, <=length]
        c = f.row(lr_key, r)[k, :, start:stop]  # [C or Q, <=length]
        x, c = (v if v.dtype == torch.int16 else v.float() for v in (x, c))
        if x.shape[-1] < length:
            x = torch.nn.functional.pad(x, (0, length - x.shape[-1]))  # [C, length]
            c = torch.nn.functional.pad(c, (0, length - c.shape[-1]))  # [C, length]
        mask = torch.arange(start, start + length) < valid  # [length]
        return {"x_codes" if hr_key == "hr_codes" else "x": x, "c_codes" if lr_key == "lr_codes" else "c": c,
                "mask": mask, "cutoff": float(self._cutoff[s][r, k])}


def shard_layout(keys: set[str] | Sequence[str]) -> tuple[str, str] | None:
    """(HR key, LR key) of a shard holding these tensors: latents (hr, lr) or codes (hr_codes,
    lr_codes), besides frames and cutoff; None when a part is missing."""
    keys = set(keys)
    hr = next((k for k in ("hr", "hr_codes") if k in keys), None)
    lr = next((k for k in ("lr", "lr_codes") if k in keys), None)
    return (hr, lr) if hr and lr and {"frames", "cutoff"} <= keys else None


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of example dicts: tensors -> [B, ...], numbers -> float32 [B], others -> lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)  # [B, ...]
        elif isinstance(values[0], (int, float)):
            out[key] = torch.tensor(values, dtype=torch.float32)  # [B]
        else:
            out[key] = values
    return out
