"""Datasets: raw-audio segments with fresh LR simulation, and pre-encoded latent shards.

Examples are mono: every channel of a file is a separate signal (a random channel per example in
`AudioSegmentDataset`, every channel in its own rows when pre-encoding), matching inference, which
processes channels as a batch. Mixing channels down could cancel out-of-phase content.

Randomness is a function of (seed, epoch, index) only (`example_rng`), so a resumed run that calls
`set_epoch` sees the same data, whatever the worker count.

Latent shard format (written by `jat.precompute`, read by `LatentShardDataset`), in one folder:

  shard-00000.safetensors, shard-00001.safetensors, ...   N rows each (N may differ, even be 0)
    hr      [N, C, T]     float16   HR latents of N fixed-length segments (T = num_frames(segment))
    lr      [N, K, C, T]  float16   LR latents of K degraded versions of each segment
    frames  [N]           int32     valid frames of each row; frames after that are padding
    cutoff  [N, K]        float32   Hz, low-pass cutoff of each LR version
    metadata (strings): format, plan (fingerprint of the shard's work), codec, hop, sample_rate,
      latent_dim, segment_seconds, versions, dtype, sources (JSON list of [file, channel, segment]
      per row), degradations (JSON [[cutoff, family, order] * K] per row), skipped (JSON {file: reason})
  stats.safetensors      LatentNorm of the HR latents over valid frames (used for x and c alike)
  stats_lr.safetensors   LatentNorm of the LR latents (for inspection)
  meta.json              codec and data config, shard list and row counts, skipped files

float16 halves the size of float32 and keeps ~3 significant digits; precompute refuses latents that
overflow it. The shard's `dtype` metadata says what was stored (float32 is also allowed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from jat.audio import AudioError, list_audio_files, load_audio
from jat.config import DataConfig
from jat.degrade import simulate_lowres

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.safetensors"
SHARD_FORMAT = "jat-latents-1"
SHARD_KEYS = ("hr", "lr", "frames", "cutoff")
MAX_REDRAWS = 100  # draws of another file before a dataset of bad files gives up


class ShardError(ValueError):
    """A latent shard folder that is missing, empty or holds a corrupt shard (named in the message)."""


def example_rng(*keys: int) -> np.random.Generator:
    """A generator determined by non-negative integer keys, e.g. (seed, epoch, index)."""
    return np.random.default_rng([int(k) for k in keys])


def as_numpy(audio: Any) -> np.ndarray:
    """float32 numpy view of audio given as a numpy array or a torch tensor."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    return np.asarray(audio, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# scanning audio files


@dataclass(frozen=True)
class AudioInfo:
    """What the up-front scan learns about one file: its length at the target rate and channels."""

    path: Path
    length: int  # samples at the dataset's sample rate (estimated from the header)
    channels: int


def scan_audio_files(
    files: Sequence[str | Path], sample_rate: int, strict: bool = False
) -> tuple[list[AudioInfo], dict[str, str]]:
    """Read every file's header (cheap); return the usable files and {path: reason} of bad ones.

    Files soundfile cannot read are tried once with `load_audio`, which may use another backend
    and otherwise gives the canonical reason. With `strict`, the first bad file raises AudioError.
    """
    infos: list[AudioInfo] = []
    skipped: dict[str, str] = {}
    for path in map(Path, files):
        try:
            info = sf.info(str(path))
            if info.frames <= 0 or info.channels <= 0:
                raise RuntimeError("no samples")
            length = int(np.ceil(info.frames * sample_rate / info.samplerate))
            infos.append(AudioInfo(path, length, int(info.channels)))
        except Exception:  # noqa: BLE001 - any header problem: let load_audio judge the file
            try:
                audio = as_numpy(load_audio(path, target_sr=sample_rate))  # [C, L]
            except AudioError as exc:
                record_bad(skipped, path, exc, strict)
                continue
            infos.append(AudioInfo(path, int(audio.shape[-1]), int(audio.shape[0])))
    return infos, skipped


def record_bad(skipped: dict[str, str], path: Path, exc: Exception, strict: bool) -> None:
    """Log and record a bad file, or raise at once (naming the file) in strict mode."""
    reason = str(exc)
    if strict:
        if str(path) in reason:
            raise exc
        raise AudioError(f"{path}: {reason}") from exc
    if str(path) not in skipped:
        log.warning("skipping bad audio file %s: %s", path, reason)
    skipped[str(path)] = reason


# ---------------------------------------------------------------------------------------------
# raw audio segments


class AudioSegmentDataset(Dataset):
    """Random HR segments of audio files with a freshly simulated LR version.

    Each item is dict(hr [1, L], lr [1, L], mask [L] bool, cutoff float) with L = segment_seconds *
    sample_rate. A file contributes about one item per segment it holds (at least one), each a random
    crop of a random channel; files shorter than a segment are right-padded (mask False on padding).

    Bad files are found by a header scan at construction or when loading (silent, NaN, ...): they are
    logged, recorded in `skipped` (path -> reason) and another file is drawn; `cfg.strict` raises.
    `skipped` is per process: files found bad inside DataLoader workers are logged there.
    """

    def __init__(
        self,
        files: Sequence[str | Path] | str | Path,
        cfg: DataConfig,
        sample_rate: int = 44100,
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
        self.infos, self.skipped = scan_audio_files(files, sample_rate, cfg.strict)
        if not self.infos:
            raise AudioError(f"no usable audio among {len(files)} files (skipped: {self.skipped})")
        counts = [max(1, round(i.length / self.segment_samples)) for i in self.infos]
        self._ends = np.cumsum(counts)  # item index -> file index by bisection

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch; crops, channels and degradations are a function of (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        # validation data is fixed: the same crops and degradations every epoch
        rng = example_rng(self.seed, self.epoch if self.train else 0, index)
        file_index = int(np.searchsorted(self._ends, index, side="right"))
        for _ in range(MAX_REDRAWS):
            info = self.infos[file_index]
            if str(info.path) not in self.skipped:
                try:
                    audio = as_numpy(load_audio(info.path, target_sr=self.sample_rate))  # [C, L]
                except AudioError as exc:
                    record_bad(self.skipped, info.path, exc, self.cfg.strict)
                else:
                    return self._example(audio, rng)
            file_index = int(rng.integers(len(self.infos)))  # drawn only after a failure: deterministic
        raise AudioError(f"no usable file after {MAX_REDRAWS} draws (skipped: {self.skipped})")

    def _example(self, audio: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        seg = self.segment_samples
        x = audio[int(rng.integers(audio.shape[0]))]  # [L_file]
        if x.shape[-1] > seg:
            start = int(rng.integers(x.shape[-1] - seg + 1))
            x = x[start : start + seg]  # [seg]
        n = x.shape[-1]
        lr, deg = simulate_lowres(x[None], self.sample_rate, rng, self.cfg)  # [1, n]
        hr_out = torch.zeros(1, seg)  # [1, L]
        lr_out = torch.zeros(1, seg)  # [1, L]
        hr_out[0, :n] = torch.from_numpy(np.ascontiguousarray(x))
        lr_out[0, :n] = torch.from_numpy(np.ascontiguousarray(as_numpy(lr).reshape(-1)[:n]))
        mask = torch.arange(seg) < n  # [L]
        return dict(hr=hr_out, lr=lr_out, mask=mask, cutoff=float(deg.cutoff))


# ---------------------------------------------------------------------------------------------
# pre-encoded latent shards


class LatentShardDataset(Dataset):
    """Pre-encoded latents: dict(x [C, T] HR, c [C, T] LR version, mask [T] bool, cutoff float).

    The LR version k of K, and with `segment_frames` a random crop inside the valid frames (padding
    with mask False when a row is shorter), are a function of (seed, epoch, index). Shard headers are
    read once for the index; tensors are memory-mapped and only the rows asked for are read.
    """

    def __init__(self, root: str | Path, segment_frames: int | None = None, seed: int = 0):
        self.root = Path(root)
        self.segment_frames = segment_frames
        self.seed = seed
        self.epoch = 0
        if not self.root.is_dir():
            raise ShardError(f"{self.root}: latent folder not found")
        self.shards = sorted(self.root.glob(SHARD_GLOB))
        if not self.shards:
            raise ShardError(f"{self.root}: no latent shards ({SHARD_GLOB}); run scripts/precompute_latents.py")
        meta_path = self.root / "meta.json"
        self.meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self._frames: list[torch.Tensor] = []  # per shard [N] int
        self._cutoff: list[torch.Tensor] = []  # per shard [N, K]
        shapes = set()
        rows = []
        for s, path in enumerate(self.shards):
            with self._open(path) as f:
                missing = set(SHARD_KEYS) - set(f.keys())
                if missing:
                    raise ShardError(f"{path}: corrupt latent shard: missing tensors {sorted(missing)}")
                n, k, c, t = f.get_slice("lr").get_shape()
                if f.get_slice("hr").get_shape() != [n, c, t]:
                    raise ShardError(f"{path}: corrupt latent shard: hr and lr shapes disagree")
                self._frames.append(f.get_tensor("frames").long())
                self._cutoff.append(f.get_tensor("cutoff").float())
            if n:
                shapes.add((k, c, t))
                rows.extend((s, r) for r in range(n))
        if len(shapes) > 1:
            raise ShardError(f"{self.root}: shards disagree on (versions, channels, frames): {sorted(shapes)}")
        if not rows:
            raise ShardError(f"{self.root}: the shards hold no rows (every source file was skipped?)")
        self.versions, self.latent_dim, self.frames = shapes.pop()
        self._rows = np.asarray(rows, dtype=np.int64)  # [items, 2] (shard, row)
        self._handles: dict[int, Any] = {}

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ShardError(f"{path}: corrupt or unreadable latent shard: {exc}") from None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to DataLoader workers

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch; LR versions and crops are a function of (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, r = (int(v) for v in self._rows[index])
        if s not in self._handles:
            self._handles[s] = self._open(self.shards[s])
        f = self._handles[s]
        rng = example_rng(self.seed, self.epoch, index)
        k = int(rng.integers(self.versions))
        valid = int(self._frames[s][r])
        length = self.segment_frames or self.frames
        start = int(rng.integers(max(0, valid - length) + 1)) if length < self.frames else 0
        stop = min(start + length, self.frames)
        try:
            x = f.get_slice("hr")[r, :, start:stop].float()  # [C, <=length]
            c = f.get_slice("lr")[r, k, :, start:stop].float()  # [C, <=length]
        except SafetensorError as exc:
            raise ShardError(f"{self.shards[s]}: corrupt latent shard: {exc}") from None
        if x.shape[-1] < length:
            x = torch.nn.functional.pad(x, (0, length - x.shape[-1]))  # [C, length]
            c = torch.nn.functional.pad(c, (0, length - c.shape[-1]))  # [C, length]
        mask = torch.arange(start, start + length) < valid  # [length]
        return dict(x=x, c=c, mask=mask, cutoff=float(self._cutoff[s][r, k]))


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
