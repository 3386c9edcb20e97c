"""torch DataLoaders over the prepared cache (``training.cache``): map-style Datasets over the grader
samples (a study's labelled windows) and the localiser samples, read from memory-mapped arrays per
item, augmented in the worker processes.

Memory stays flat in the number of studies: the index is a few integers per sample, and a dataset
keeps at most ``OPEN_STUDIES`` studies' arrays mapped (pages touched stay in the OS page cache,
not in the process). Augmentation is deterministic per (seed, stage, epoch, sample): the same
whatever the number of workers, and a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, Dataset, Sampler

from inference.labels import CONDITIONS, LABELS, ConditionGroup
from training.augment import AugmentConfig, augment_grader_crop, augment_localiser
from training.cache import PrepareSpec, load_array, window_array
from training.data import HEATMAP_SIGMA_PX, render_heatmaps, window_crop
from training.distributed import shard

OPEN_STUDIES = 8  # studies kept memory-mapped per dataset copy (a batch visits a study's samples together)
Key = tuple[int, int]  # (epoch, sample index): what the samplers yield and the datasets take
_GRADER, _LOCALISER = 1, 2  # stage codes in the augmentation seed


class _Arrays:
    """A small LRU of memory-mapped study arrays."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.open: OrderedDict[tuple[int, str], NDArray] = OrderedDict()

    def get(self, study_id: int, name: str) -> NDArray:
        key = (study_id, name)
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key]
        array = self.open[key] = load_array(self.cache, study_id, name)
        while len(self.open) > OPEN_STUDIES * 2:
            self.open.popitem(last=False)
        return array

    def __getstate__(self) -> dict:
        return {"cache": self.cache, "open": OrderedDict()}  # worker processes map their own


@dataclass(frozen=True)
class GraderIndex:
    """The grader samples of some studies: CSR offsets per study into per-sample rows."""

    study_ids: NDArray[np.int64]  # (S,) studies with at least one window
    starts: NDArray[np.int64]  # (S + 1,) the samples of study s are starts[s]:starts[s + 1]
    rows: NDArray[np.int32]  # (N,) the window's row in its study's array of its window shape
    labels: NDArray[np.int8]  # (N,) label index (LABELS order)
    targets: NDArray[np.int8]  # (N,) class index

    @classmethod
    def build(cls, cache: Path, study_ids: list[int], spec: PrepareSpec | None = None) -> GraderIndex:
        """The samples of ``study_ids`` in a cache prepared with ``spec`` (default: the small preset's)."""
        shape_of_label = _shape_of_label(spec or PrepareSpec())
        ids, starts, rows, labels, targets = [], [0], [], [], []
        for sid in study_ids:
            window_labels = load_array(cache, sid, "window_labels", mmap=False)
            study_targets = load_array(cache, sid, "targets", mmap=False)
            if not len(window_labels):
                continue
            ids.append(sid)
            shapes = shape_of_label[window_labels.astype(np.int64)]
            rank = np.zeros(len(shapes), np.int32)  # each window's row in its shape's array
            for k in np.unique(shapes):
                rank[shapes == k] = np.arange(int((shapes == k).sum()), dtype=np.int32)
            rows.append(rank)
            labels.append(window_labels.astype(np.int8))
            targets.append(study_targets[window_labels].astype(np.int8))
            starts.append(starts[-1] + len(window_labels))
        return cls(np.array(ids, np.int64), np.array(starts, np.int64), _concat(rows, np.int32),
                   _concat(labels, np.int8), _concat(targets, np.int8))

    def __len__(self) -> int:
        return len(self.rows)

    def study_of(self, i: int) -> int:
        """The position (in ``study_ids``) of sample i's study."""
        return int(np.searchsorted(self.starts, i, side="right") - 1)


def _shape_of_label(spec: PrepareSpec) -> NDArray[np.int64]:
    """Per label (LABELS order), the index of its window shape (``PrepareSpec.window_shapes``)."""
    return np.array([spec.window_index(lb.condition.group) for lb in LABELS], np.int64)


def _concat(parts: list[NDArray], dtype: type) -> NDArray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


#: condition index of each label
_CONDITION_OF_LABEL = np.array([CONDITIONS.index(lb.condition) for lb in LABELS], np.int64)
#: index (0 spinal, 1 foraminal, 2 subarticular) of each condition's group, as the grader's heads
_GROUPS = list(ConditionGroup)


class GraderDataset(Dataset):
    """(crop (slices, n, n) float32 of its group's grader crop, target, condition index, study
    position) per key; training crops (``sigma_px`` given) are augmented, validation crops are the
    centred window. Batch them with ``collate_grader`` (crops of several shapes)."""

    def __init__(self, cache: Path, index: GraderIndex, sigma_px: dict[int, float] | None = None,
                 augment: AugmentConfig | None = None, seed: int = 0, spec: PrepareSpec | None = None):
        self.arrays, self.index, self.sigma_px = _Arrays(cache), index, sigma_px
        self.augment, self.seed, self.spec = augment or AugmentConfig(), seed, spec or PrepareSpec()
        self.shape_of_label = _shape_of_label(self.spec)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Key) -> tuple[NDArray[np.float32], int, int, int]:
        epoch, i = key
        s = self.index.study_of(i)
        label = int(self.index.labels[i])
        array = window_array(int(self.shape_of_label[label]))
        window = np.asarray(self.arrays.get(int(self.index.study_ids[s]), array)[self.index.rows[i]])
        cond = int(_CONDITION_OF_LABEL[label])
        group = LABELS[label].condition.group
        spec = self.spec.model.grader(group)
        if self.sigma_px is None:
            crop = window_crop(window, 0, 0, 0, spec).astype(np.float32)
        else:
            rng = np.random.default_rng([self.seed, _GRADER, epoch, i])
            crop = augment_grader_crop(window, group=group, sigma_px=self.sigma_px[_GROUPS.index(group)], rng=rng,
                                       cfg=self.augment, spec=spec)
        return np.ascontiguousarray(crop, np.float32), int(self.index.targets[i]), cond, s


GraderBatch = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]


def collate_grader(items: list[tuple[NDArray[np.float32], int, int, int]]) -> GraderBatch:
    """A grader batch: the crops as one tensor per crop shape (in order of first appearance), and
    targets, conditions and study positions in the same order (samples grouped by shape, stable;
    with one shape the batch's order is the samplers')."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, item in enumerate(items):
        by_shape.setdefault(item[0].shape, []).append(j)
    order = [j for js in by_shape.values() for j in js]
    crops = [torch.from_numpy(np.stack([items[j][0] for j in js])) for js in by_shape.values()]
    columns = [torch.tensor([items[j][k] for j in order], dtype=torch.int64) for k in (1, 2, 3)]
    return crops, columns[0], columns[1], columns[2]


class StudyBatchSampler(Sampler[list[Key]]):
    """Batches of all the samples of ``batch_studies`` studies (the loss's any-severe-spinal term is
    per study), studies shuffled per epoch by (seed, epoch); call ``set_epoch`` before each epoch.

    With several training processes (``rank`` of ``world``) this is the DistributedSampler idea
    applied to batches: every rank draws the same global batches from (seed, epoch) and takes its
    share of each one's studies (``training.distributed.shard``), so N processes train on the global
    batches that one process would; ``batch_studies`` is the global batch."""

    def __init__(self, starts: NDArray[np.int64], batch_studies: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        self.starts, self.k, self.seed, self.shuffle, self.epoch = starts, batch_studies, seed, shuffle, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-(len(self.starts) - 1) // self.k)

    def __iter__(self) -> Iterator[list[Key]]:
        n = len(self.starts) - 1
        order = np.random.default_rng([self.seed, _GRADER, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        for b in range(0, n, self.k):
            studies = shard(order[b: b + self.k].tolist(), self.rank, self.world)
            yield [(self.epoch, int(i)) for s in studies for i in range(self.starts[s], self.starts[s + 1])]


@dataclass(frozen=True)
class LocaliserIndex:
    """The localiser samples of some studies: (study id, row in its localiser arrays)."""

    study_ids: NDArray[np.int64]
    rows: NDArray[np.int32]

    @classmethod
    def build(cls, cache: Path, study_ids: list[int], jittered: bool = True) -> LocaliserIndex:
        """Every localiser image of the studies (``jittered=False``: only those at the served centre)."""
        ids, rows = [], []
        for sid in study_ids:
            flags = load_array(cache, sid, "localiser_jittered", mmap=False)
            keep = np.flatnonzero(np.ones(len(flags), bool) if jittered else ~flags)
            ids += [sid] * len(keep)
            rows += keep.tolist()
        return cls(np.array(ids, np.int64), np.array(rows, np.int32))

    def __len__(self) -> int:
        return len(self.rows)


class LocaliserDataset(Dataset):
    """(image (3, n, n), heatmap target (5, n, n)) float32 per key; augmented when training."""

    def __init__(self, cache: Path, index: LocaliserIndex, train: bool, augment: AugmentConfig | None = None,
                 seed: int = 0, sigma_px: float = HEATMAP_SIGMA_PX):
        self.arrays, self.index, self.train = _Arrays(cache), index, train
        self.augment, self.seed, self.sigma_px = augment or AugmentConfig(), seed, sigma_px

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Key) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        epoch, i = key
        sid, row = int(self.index.study_ids[i]), int(self.index.rows[i])
        image = np.asarray(self.arrays.get(sid, "localiser_images")[row])
        target = render_heatmaps(self.arrays.get(sid, "localiser_peaks")[row], image.shape[-1], self.sigma_px)
        if self.train:
            rng = np.random.default_rng([self.seed, _LOCALISER, epoch, i])
            image, target = augment_localiser(image, target, rng=rng, cfg=self.augment)
        return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(target, np.float32)


class EpochBatchSampler(Sampler[list[Key]]):
    """Every sample index once per epoch, as (epoch, index) keys in batches of ``batch`` (the last
    one smaller): shuffled by (seed, epoch), or in order. With ``world`` processes, rank ``rank``
    takes its share of each global batch of ``batch`` (as ``StudyBatchSampler``)."""

    def __init__(self, n: int, batch: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.shuffle, self.epoch = n, batch, seed, shuffle, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self) -> Iterator[list[Key]]:
        order = (np.random.default_rng([self.seed, _LOCALISER, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        for b in range(0, self.n, self.batch):
            yield [(self.epoch, int(i)) for i in shard(order[b: b + self.batch].tolist(), self.rank, self.world)]


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # the worker processes are the parallelism


def make_loader(dataset: Dataset, batch_sampler: Sampler, workers: int, device: torch.device,
                collate_fn: Any = None) -> DataLoader:
    """A DataLoader: ``workers`` processes (0: in this one), prefetching, persistent across epochs,
    batches in pinned memory on CUDA. The workers are spawned, not forked: a fork of this process
    after OpenCV's or OpenMP's thread pools ran (the pipeline's validation) can inherit a held lock
    and hang."""
    pin = device.type == "cuda"
    if workers <= 0:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=0, pin_memory=pin, collate_fn=collate_fn)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin, collate_fn=collate_fn,
                      persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init,
                      multiprocessing_context="spawn")


def localiser_batches(n: int, batch: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1) -> EpochBatchSampler:
    """Batches of ``batch`` localiser keys (the last one smaller); rank ``rank``'s share of each of
    ``world`` processes."""
    return EpochBatchSampler(n, batch, seed, shuffle, rank, world)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of a loader made by ``make_loader`` (its samplers draw from it)."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, StudyBatchSampler | EpochBatchSampler):
        raise TypeError(f"not a loader of make_loader's samplers: {type(sampler).__name__}")
    sampler.set_epoch(epoch)
