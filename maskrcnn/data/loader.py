"""Batching: an infinite, seeded, aspect-ratio-grouped, resumable train stream and an ordered test loader.

Every batch of the train stream is a pure function of (seed, iteration): the order of images comes
from a permutation per epoch seeded by (seed, epoch), and each image's random augmentation (flips,
crops, turns, colour: `maskrcnn.data.augment`) runs under a torch seed derived from (seed, iteration,
position). Resuming at iteration N replays the index stream N batches without loading any image, so
it yields exactly what an uninterrupted run would have, whatever `num_workers` is.

Distributed training (`world_size` > 1): `batch_size` is the global batch. Every process builds the
same global stream and takes its own contiguous slice of each global batch (rank r of W gets
positions r*B/W .. (r+1)*B/W - 1), with the item seeds of those global positions. So the processes
see disjoint images (within an epoch every image goes to exactly one of them), every global batch
still comes from one aspect-ratio group, resuming works as above, and W processes together load
exactly the images and augmentations that one process with the whole batch would.

The train stream survives two kinds of data faults without stopping the run: an image that cannot
be read (it is reported once, and a replacement drawn from the item's own seed takes its place, so
batches keep their size and stay deterministic) and a worker process that dies (the loader is
rebuilt at the batch it was about to deliver: `maskrcnn.data.workers`). Past `max_bad_images` distinct
unreadable images or `max_worker_restarts` restarts it raises `DataError`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from maskrcnn.data.workers import SupervisedWorkers, ignore_sigint
from maskrcnn.errors import DataError, UserError

log = logging.getLogger(__name__)

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]
MAX_REPLACEMENTS = 10  # draws per batch slot before an unreadable image's slot is left empty


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
    """Infinite stream of index batches, each from one aspect-ratio group, starting at `start_iter`.

    With `world_size` > 1, `batch_size` is the global batch and this process yields its slice
    (`rank`) of every global batch (see the module docstring).
    """

    def __init__(self, groups: np.ndarray, batch_size: int, seed: int = 0, start_iter: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(groups) == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} does not split evenly over {world_size} processes")
        self.groups = np.asarray(groups, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.start_iter = start_iter
        self.rank = rank
        self.world_size = world_size

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
        per_rank = self.batch_size // self.world_size
        first = self.rank * per_rank
        for batch in batches:
            yield [(batch[k], _item_seed(self.seed, iteration, k)) for k in range(first, first + per_rank)]
            iteration += 1


def _item_seed(seed: int, iteration: int, position: int) -> int:
    """Return a well-mixed 63-bit seed for one image of one batch."""
    return int(np.random.SeedSequence([seed, iteration, position]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _SeededItems(Dataset):
    """Looks up `(index, seed)` keys, running the dataset's random augmentation under that seed.

    Returns `(image, target, failures)`: an image that cannot be read (`UserError`, `OSError`) is
    replaced by another one drawn from the same seed, and `(index, message)` of each failure is
    passed along so the main process can report it (workers cannot log for it). After
    `MAX_REPLACEMENTS` failed draws the image is None.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any, list[tuple[int, str]]]:
        index, seed = key
        failures: list[tuple[int, str]] = []
        draws = np.random.default_rng(seed)
        for _ in range(MAX_REPLACEMENTS + 1):
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
                torch.manual_seed(seed)
                try:
                    image, target = self.dataset[index]
                    return image, target, failures
                except (UserError, OSError) as e:
                    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    failures.append((index, message))
            index = int(draws.integers(len(self.dataset)))
        return None, None, failures


def _collate_train(batch: Sequence[tuple[Any, Any, list[tuple[int, str]]]]) -> tuple[list, list, list]:
    """Return (images, targets, failures) lists; slots whose every draw failed are left out."""
    kept = [item for item in batch if item[0] is not None]
    return [i[0] for i in kept], [i[1] for i in kept], [f for item in batch for f in item[2]]


class TrainStream:
    """The infinite train batch stream, resumable at `iteration`, that survives bad images and dead workers.

    Iterating gives `(images, targets)` exactly as `build_train_loader` documents. `bad_images`
    maps dataset indices that failed to load to their message; `worker_restarts` counts rebuilds
    of the loader after a worker died (`maskrcnn.data.workers.SupervisedWorkers`).
    """

    def __init__(
        self,
        make_loader: Callable[[int], DataLoader],
        start_iter: int,
        max_bad_images: int,
        max_worker_restarts: int,
    ) -> None:
        self.iteration = start_iter  # the index of the next batch this stream yields
        self.max_bad_images = max_bad_images
        self.bad_images: dict[int, str] = {}
        self._workers = SupervisedWorkers(make_loader, start_iter, max_worker_restarts)

    @property
    def worker_restarts(self) -> int:
        """How many times the loader was rebuilt because a worker process died."""
        return self._workers.restarts

    def close(self) -> None:
        """Stop the worker processes and give SIGCHLD back to its previous handler."""
        self._workers.close()

    # -- iteration --

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> Batch:
        images, targets, failures = self._workers.next_batch(self.iteration)
        self.iteration += 1
        for index, message in failures:
            self._report_bad_image(index, message)
        if not images:
            raise DataError(
                f"no image of the batch for iteration {self.iteration} could be read (each slot tried "
                f"{MAX_REPLACEMENTS + 1} images; the last error: {failures[-1][1]}); check data.train's "
                "image directories"
            )
        return images, targets

    def _report_bad_image(self, index: int, message: str) -> None:
        if index in self.bad_images:
            return  # reported the first time; every later epoch meets it again
        self.bad_images[index] = message
        if len(self.bad_images) > self.max_bad_images:
            n = len(self.bad_images)
            raise DataError(
                f"{n} training image{'s' if n > 1 else ''} could not be read, more than "
                f"data.max_bad_images={self.max_bad_images} (the last: {message}); fix or remove them "
                "(`maskrcnn check-dataset ANN.json:IMAGE_DIR --decode` lists them all), or raise "
                "data.max_bad_images"
            )
        log.warning("skipping a training image (%d of at most data.max_bad_images=%d; another image takes "
                    "its place): %s", len(self.bad_images), self.max_bad_images, message)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    seed: int = 0,
    start_iter: int = 0,
    max_bad_images: int = 50,
    max_worker_restarts: int = 5,
    rank: int = 0,
    world_size: int = 1,
) -> TrainStream:
    """Return an infinite iterator of (images, targets) batches, deterministic for (seed, start_iter).

    Unreadable images are reported and replaced, dead workers restarted (see `TrainStream`); past
    the limits it raises `DataError`. Call `.close()` when done to stop worker processes at once.
    With `world_size` > 1, `batch_size` is the global batch and each batch holds this `rank`'s
    `batch_size // world_size` images of it (a disjoint slice; see the module docstring).
    """
    groups = aspect_ratio_groups(dataset) if aspect_ratio_grouping else np.zeros(len(dataset), np.int64)
    items = _SeededItems(dataset)

    def make_loader(start: int) -> DataLoader:
        return DataLoader(
            items,
            batch_sampler=GroupedBatchSampler(groups, batch_size, seed=seed, start_iter=start, rank=rank,
                                              world_size=world_size),
            num_workers=num_workers,
            collate_fn=_collate_train,
            worker_init_fn=ignore_sigint if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # DataLoader's worker seed, not the global RNG
        )

    return TrainStream(make_loader, start_iter, max_bad_images, max_worker_restarts)


def build_test_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0) -> Iterable[Batch]:
    """Return a finite loader of (images, targets) batches in dataset order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_lists)
