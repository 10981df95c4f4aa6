"""Training datasets of the four recipe stages, a resumable shuffling sampler, and the batch collate.

Every item is ``(images [k, 3, s, s] float, labels [k] int64, skipped: list[str])``:

* ``views`` (smoke, stage1 = v83, stage2 = v86): training image ``i`` -> ``ncrops`` views (1 moderate +
  hard), labels ``i``;
* ``views`` + negatives (stage3 = v98): plus ``num_negatives`` random reference images (plain resize, as v98.py),
  labels ``NEGATIVE_LABEL_OFFSET + reference index``;
* ``pairs`` (stage4 = v107): positive pair ``i`` of a ground-truth CSV -> (query, reference), labels ``i``, plus
  ``num_negatives`` random references that are nobody's positive. As in the seed, v107 uses the plain
  resize-normalise transform for all of them.

Randomness is a pure function of ``(seed, epoch, index)``: each item reseeds ``random``, ``numpy`` and
``torch`` before drawing its augmentations, so the views do not depend on the number of DataLoader
workers, and resuming mid-epoch reproduces the batches an uninterrupted run would have seen.

A file that cannot be decoded is skipped (the next index stands in, so batch sizes stay equal across
DDP ranks) and reported in ``skipped``; training never stops on one bad file.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from isc.data.images import load_image
from isc.errors import BadImageError, ConfigError
from isc.losses import NEGATIVE_LABEL_OFFSET

log = logging.getLogger(__name__)

MAX_SUBSTITUTES = 64


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 32-bit seed for one item of one epoch."""
    return (seed * 1_000_003 + epoch * 10_007 + index * 7_919 + 12_345) % (2**32)


def seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.random.default_generator.manual_seed(s)  # CPU generator only: transforms never touch CUDA


class _StageDataset(Dataset):
    """Shared machinery: per-item seeding, bad-image substitution, random negative references."""

    def __init__(self, seed: int, negatives: Sequence[Path], num_negatives: int,
                 negative_transform: Callable[[Any], torch.Tensor] | None):
        self.seed = int(seed)
        self.epoch = 0
        self.negatives = list(negatives)
        self.num_negatives = int(num_negatives)
        self.negative_transform = negative_transform
        if self.num_negatives and not self.negatives:
            raise ConfigError("num_negatives", "no reference images to draw negatives from")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _negatives(self, skipped: list[str]) -> tuple[list[torch.Tensor], list[int]]:
        images, labels = [], []
        while len(images) < self.num_negatives:
            j = random.randrange(len(self.negatives))
            try:
                img = load_image(self.negatives[j])
            except BadImageError as exc:
                skipped.append(str(exc.path))
                if len(skipped) > MAX_SUBSTITUTES:
                    raise
                continue
            images.append(self.negative_transform(img))
            labels.append(NEGATIVE_LABEL_OFFSET + j)
        return images, labels

    def _positives(self, index: int) -> tuple[list[torch.Tensor], int]:
        raise NotImplementedError

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        # (epoch, index) comes from EpochTaggedSampler: persistent DataLoader workers hold their own copy
        # of the dataset, so set_epoch() in the main process never reaches them; the epoch rides along.
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        seed_everything(item_seed(self.seed, epoch, index))
        skipped: list[str] = []
        for attempt in range(MAX_SUBSTITUTES):
            i = (index + attempt) % len(self)
            try:
                views, label = self._positives(i)
                break
            except BadImageError as exc:
                skipped.append(str(exc.path))
        else:
            raise BadImageError(skipped[-1], f"{MAX_SUBSTITUTES} consecutive unreadable images; giving up")
        neg_images, neg_labels = self._negatives(skipped) if self.num_negatives else ([], [])
        images = torch.stack(list(views) + neg_images)
        labels = torch.tensor([label] * len(views) + neg_labels, dtype=torch.long)
        return images, labels, skipped


class ViewsDataset(_StageDataset):
    """smoke / stage1 / stage2 / stage3: ``ncrops`` views of training image ``i`` (+ optional negatives)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], list[torch.Tensor]], seed: int = 0,
                 negatives: Sequence[Path] = (), num_negatives: int = 0,
                 negative_transform: Callable[[Any], torch.Tensor] | None = None):
        super().__init__(seed, negatives, num_negatives, negative_transform)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def _positives(self, index: int) -> tuple[list[torch.Tensor], int]:
        return list(self.transform(load_image(self.paths[index]))), index


class PairsDataset(_StageDataset):
    """stage4 (v107): (query, reference) positive pair ``i`` with one transform, label ``i`` (+ negatives)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], transform: Callable[[Any], torch.Tensor], seed: int = 0,
                 negatives: Sequence[Path] = (), num_negatives: int = 0):
        super().__init__(seed, negatives, num_negatives, transform)
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def _positives(self, index: int) -> tuple[list[torch.Tensor], int]:
        q, r = self.pairs[index]
        return [self.transform(load_image(q)), self.transform(load_image(r))], index


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, list[str]]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Items -> images [sum k, 3, s, s], labels [sum k], skipped file names."""
    images = torch.cat([b[0] for b in batch])
    labels = torch.cat([b[1] for b in batch])
    skipped = [p for b in batch for p in b[2]]
    return images, labels, skipped


class ResumableShuffleSampler(Sampler[int]):
    """DistributedSampler(shuffle=True, drop_last=True) semantics plus a start offset for resuming.

    Epoch ``e``'s permutation depends only on ``(seed, e)``; rank ``r`` of ``W`` takes every ``W``-th
    index; the tail that does not fill a whole per-rank batch is dropped; ``start_batch`` skips batches
    already trained on (mid-epoch resume) without loading them.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _indices(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world_size
        mine = perm[: per_rank * self.world_size][self.rank :: self.world_size]
        usable = self.batches_per_epoch * self.batch_size
        return mine[self.start_batch * self.batch_size : usable].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return max(0, (self.batches_per_epoch - self.start_batch) * self.batch_size)


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for each index of a :class:`ResumableShuffleSampler` (see __getitem__).

    Why: with ``persistent_workers=True`` the workers keep running across epochs (no re-fork and no cold
    pipeline at every epoch start: ~1 s per epoch on 2 CPU cores, a fifth of a demo epoch), but their
    dataset copies never see ``set_epoch``. The sampler runs in the main process, so it can tell them.
    """

    def __init__(self, sampler: ResumableShuffleSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def read_positive_pairs(path: Path, data_root: Path) -> list[tuple[Path, Path]]:
    """Positive (query image, reference image) paths of a ground-truth CSV; distractors are skipped."""
    from isc.data.disc21 import DISC21, list_images
    from isc.io import read_ground_truth

    data = DISC21(data_root)
    gt = read_ground_truth(path)
    queries = dict(list_images(data.query_dir))
    refs = dict(list_images(data.reference_dir))
    pairs, missing = [], []
    for q, r in _gt_pairs(gt):
        if q in queries and r in refs:
            pairs.append((queries[q], refs[r]))
        else:
            missing.append(f"{q},{r}")
    if missing:
        log.warning("%s: %d pair(s) have no image under %s, skipped: %s", path, len(missing), data.root,
                    missing[:10])
    if not pairs:
        raise ConfigError("pairs", f"{path}: no positive (query, reference) pair with images under {data.root}")
    return pairs


def _gt_pairs(gt: Any) -> list[tuple[str, str]]:
    """(query_id, reference_id) positives of an ``isc.io.GroundTruth``, sorted (a stable item order)."""
    return sorted((str(q), str(r)) for q, r in gt.positives)
