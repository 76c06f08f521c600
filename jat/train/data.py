"""What the trainer trains on (docs/design.md section 4): a dataset, the latent space it lives in, and
the one way its raw batches become normalised (x, c, mask) latent batches on the device.

Two kinds of dataset, each with its own batch builder, chosen once when the data is prepared:

* pre-encoded latent shards (`LatentShardDataset`, or any dataset of dict(x, c, mask)): normalised;
* audio (`AudioSegmentDataset`, dict(hr, lr, mask)): encoded on the device, then normalised.

`prepare` builds both from a Config, the latent space from the first source that has one: the base
checkpoint of a fine-tune (`train.init_from`), the shards' statistics, an estimate from the first audio
examples, or the identity. The trainer itself never looks at the data's format.

Order: `StepBatches` fixes, per epoch, a permutation of the examples cut into global batches, of which
each process takes its contiguous slice, so a resumed run, or a run over more processes with the same
global batch, sees the same examples. One DataLoader serves the whole run (`TrainingData.loader`): its
batch sampler runs epoch after epoch and hands out (epoch, index) pairs (`EpochIndexed`), so workers
are started once, may persist and prefetch, and still draw each epoch's data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from jat.checkpoint import load
from jat.codecs import LatentNorm, latent_frames
from jat.codecs.latent import LatentSpace
from jat.config import Config, ConfigError
from jat.data.datasets import AudioSegmentDataset, LatentShardDataset, collate
from jat.data.shards import ShardSource

NORM_EXAMPLES = 32  # audio training: examples whose HR latents give the normalisation
PREFETCH = 2  # batches each DataLoader worker keeps ready


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, T] normalised HR latent
    c: torch.Tensor  # [B, C, T] normalised LR latent
    mask: torch.Tensor  # [B, T] bool


class StepBatches:
    """Index batches for one process: a fixed permutation per epoch, cut into global batches of
    `global_batch` (the rest dropped), of which this rank takes its contiguous `batch_size` slice."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.global_batch = batch_size * world
        self.per_epoch = n // self.global_batch
        if self.per_epoch == 0:
            raise ConfigError(f"dataset of {n} examples is smaller than one global batch "
                              f"({batch_size} x {world} processes): train.batch_size")

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        for b in range(start, self.per_epoch):
            lo = b * self.global_batch + self.rank * self.batch_size
            yield perm[lo:lo + self.batch_size].tolist()


def _latent_batch(latents: LatentSpace, raw: dict[str, Any], device, dtype) -> Batch:
    """Pre-encoded pairs: rebuild latents from codes on the device where the shards hold codes
    (x_codes / c_codes [B, Q, T] int16), then normalise."""
    x, c = ((latents.from_codes(raw[f"{k}_codes"].to(device)) if f"{k}_codes" in raw else raw[k].to(device))
            .to(dtype) for k in ("x", "c"))  # [B, C, T]
    return Batch(latents.normalize(x), latents.normalize(c), raw["mask"].to(device))


def _audio_batch(latents: LatentSpace, raw: dict[str, Any], device, dtype) -> Batch:
    """Audio pairs [B, 1, L]: encode on the device (the GPU path), then normalise."""
    with torch.no_grad():
        x = latents.codec.encode(raw["hr"].to(device)).to(dtype)  # [B, C, T]
        c = latents.codec.encode(raw["lr"].to(device)).to(dtype)
    mask = latents.frame_mask(raw["mask"].to(device), x.shape[-1])  # [B, T]
    return Batch(latents.normalize(x), latents.normalize(c), mask)


class EpochIndexed(Dataset):
    """`dataset` addressed by (epoch, index) pairs: the epoch travels with each index, so DataLoader
    workers, persistent or not, draw that epoch's crops and degradations (`set_epoch` on their own
    copy) and one loader serves every epoch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def _run_batches(sampler: StepBatches, epoch: int, start: int) -> Iterator[list[tuple[int, int]]]:
    """(epoch, index) batches from batch `start` of `epoch` on, epoch after epoch, forever."""
    while True:
        for batch in sampler.epoch_batches(epoch, start):
            yield [(epoch, i) for i in batch]
        epoch, start = epoch + 1, 0


@dataclass
class TrainingData:
    """A dataset, its latent space, and how its raw batches become `Batch`es; the DataLoader settings
    (`data.num_workers`, `data.pin_memory`, `data.persistent_workers`)."""

    dataset: Dataset
    latents: LatentSpace
    build: Callable[[LatentSpace, dict[str, Any], torch.device, torch.dtype], Batch] = _latent_batch
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int = PREFETCH

    def to_batch(self, raw: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Batch:
        return self.build(self.latents, raw, device, dtype)

    def loader(self, sampler: StepBatches, micro_start: int) -> DataLoader:
        """One DataLoader for the whole run: raw micro-batches for this process from global micro-batch
        `micro_start` on, forever. With workers, each keeps `prefetch_factor` batches ready."""
        epoch, start = divmod(micro_start, sampler.per_epoch)
        workers = self.num_workers > 0
        return DataLoader(EpochIndexed(self.dataset), batch_sampler=_run_batches(sampler, epoch, start),
                          collate_fn=collate, num_workers=self.num_workers,
                          pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.persistent_workers and workers,
                          prefetch_factor=self.prefetch_factor if workers else None)

    def batches(self, sampler: StepBatches, micro_start: int) -> Iterator[dict[str, Any]]:
        """Raw micro-batches for this process from global micro-batch `micro_start` on, forever; closing
        the generator drops the loader's iterator, which stops its workers."""
        yield from self.loader(sampler, micro_start)


def _audio_and_mask(item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return item["hr"][None], item["mask"][None]  # [1, 1, L], [1, L]


def prepare(cfg: Config, dataset: Dataset | None = None, norm: LatentNorm | None = None,
            device: torch.device | str = "cpu") -> TrainingData:
    """The training data a Config names (or `dataset`), with its latent space (`norm` if given)."""
    d = cfg.data
    cfg.check_paths(need_data=dataset is None)  # before any work: every path the run reads exists
    if dataset is None:
        if d.latents:
            dataset = LatentShardDataset(d.latents, segment_frames=latent_frames(d.segment_seconds),
                                         seed=cfg.train.seed)
        elif d.train:
            dataset = AudioSegmentDataset(d.train, d, seed=cfg.train.seed)
        else:
            raise ConfigError("config: data.latents or data.train must name the training data")
    audio = isinstance(dataset, AudioSegmentDataset)
    if norm is not None:
        latents = LatentSpace(cfg.codec, norm)
    elif cfg.train.init_from:  # a fine-tune keeps its base's latent space
        latents = LatentSpace(cfg.codec, load.latent_norm(cfg.train.init_from, cfg.model.in_channels))
    elif d.latents:
        source = dataset.source if isinstance(dataset, LatentShardDataset) else ShardSource(d.latents)
        latents = LatentSpace(cfg.codec, source.latent_norm())  # a local folder, a URL or a tar
    elif audio:
        items = (_audio_and_mask(dataset[i]) for i in range(min(NORM_EXAMPLES, len(dataset))))
        latents = LatentSpace.identity(cfg.codec, cfg.model.in_channels).estimate_norm(items, device)
    else:
        latents = LatentSpace.identity(cfg.codec, cfg.model.in_channels)
    return TrainingData(dataset, latents.to(device), _audio_batch if audio else _latent_batch, d.num_workers,
                        d.pin_memory, d.persistent_workers)
