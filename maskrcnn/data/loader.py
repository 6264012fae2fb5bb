"""Batching: an infinite, seeded, aspect-ratio-grouped, resumable train stream and an ordered test loader.

Every batch of the train stream is a pure function of (seed, iteration): the order of images comes
from a permutation per epoch seeded by (seed, epoch), and each image's random augmentation (flips)
runs under a torch seed derived from (seed, iteration, position). Resuming at iteration N replays
the index stream N batches without loading any image, so it yields exactly what an uninterrupted
run would have, whatever `num_workers` is.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


def collate_lists(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> Batch:
    """Return (images, targets) as two lists; the model pads images itself, so nothing is stacked."""
    return [item[0] for item in batch], [item[1] for item in batch]


def aspect_ratio_groups(dataset: Dataset) -> np.ndarray:
    """Return per-image group ids from annotation sizes: 0 for landscape/square (w >= h), 1 for portrait."""
    if isinstance(dataset, Subset):
        return aspect_ratio_groups(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    sizes = getattr(dataset, "image_sizes", None)
    if sizes is None:  # unknown sizes: one group rather than loading every image to find out
        return np.zeros(len(dataset), dtype=np.int64)
    hw = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return (hw[:, 1] < hw[:, 0]).astype(np.int64)


class GroupedBatchSampler:
    """Infinite stream of index batches, each from one aspect-ratio group, starting at `start_iter`."""

    def __init__(self, groups: np.ndarray, batch_size: int, seed: int = 0, start_iter: int = 0) -> None:
        if len(groups) == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.groups = np.asarray(groups, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.start_iter = start_iter

    def index_batches(self) -> Iterator[list[int]]:
        """Yield batches of dataset indices from iteration 0, forever."""
        buckets: dict[int, list[int]] = {int(g): [] for g in np.unique(self.groups)}
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
            for i, g in zip(order.tolist(), self.groups[order].tolist()):
                bucket = buckets[g]
                bucket.append(i)
                if len(bucket) == self.batch_size:
                    yield list(bucket)
                    bucket.clear()  # leftovers carry into the next epoch instead of being dropped
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.index_batches()
        for _ in range(self.start_iter):  # replay indices only: no image is read
            next(batches)
        iteration = self.start_iter
        for batch in batches:
            yield [(i, _item_seed(self.seed, iteration, k)) for k, i in enumerate(batch)]
            iteration += 1


def _item_seed(seed: int, iteration: int, position: int) -> int:
    """Return a well-mixed 63-bit seed for one image of one batch."""
    return int(np.random.SeedSequence([seed, iteration, position]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _SeededItems(Dataset):
    """Looks up `(index, seed)` keys, running the dataset's random augmentation under that seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(seed)
            return self.dataset[index]


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    seed: int = 0,
    start_iter: int = 0,
) -> Iterator[Batch]:
    """Return an infinite iterator of (images, targets) batches, deterministic for (seed, start_iter)."""
    groups = aspect_ratio_groups(dataset) if aspect_ratio_grouping else np.zeros(len(dataset), np.int64)
    sampler = GroupedBatchSampler(groups, batch_size, seed=seed, start_iter=start_iter)
    loader = DataLoader(
        _SeededItems(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_lists,
        generator=torch.Generator().manual_seed(seed),  # DataLoader's worker seed, not the global RNG
    )
    return iter(loader)


def build_test_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0) -> Iterable[Batch]:
    """Return a finite loader of (images, targets) batches in dataset order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_lists)
