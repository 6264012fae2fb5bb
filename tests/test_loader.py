"""Train/test loaders: list collation, aspect-ratio grouping, determinism and exact resumption."""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import Dataset, Subset

from maskrcnn.data.loader import aspect_ratio_groups, build_test_loader, build_train_loader


class FakeDataset(Dataset):
    """Tiny images whose sizes alternate landscape/portrait; the target records a random draw."""

    def __init__(self, n: int = 13) -> None:
        self.image_sizes = [(4, 6) if i % 3 else (6, 4) for i in range(n)]  # (h, w)

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, i: int):
        h, w = self.image_sizes[i]
        return torch.zeros(3, h, w), {"index": i, "draw": torch.rand(()).item()}


def _take(it, n):
    return [([tuple(im.shape) for im in images], [(t["index"], t["draw"]) for t in targets])
            for images, targets in itertools.islice(it, n)]


def test_batches_are_lists_grouped_by_aspect_ratio():
    ds = FakeDataset()
    for images, targets in itertools.islice(build_train_loader(ds, batch_size=3, seed=1), 20):
        assert isinstance(images, list) and isinstance(targets, list) and len(images) == 3
        landscape = {im.shape[2] >= im.shape[1] for im in images}
        assert len(landscape) == 1
        assert all(ds.image_sizes[t["index"]] == tuple(im.shape[1:]) for im, t in zip(images, targets))


def test_every_image_visited_each_epoch_without_grouping():
    ds = FakeDataset(12)
    batches = _take(build_train_loader(ds, batch_size=4, aspect_ratio_grouping=False, seed=0), 3)
    assert sorted(i for _, b in batches for i, _ in b) == list(range(12))


def test_deterministic_for_a_seed_and_different_across_seeds():
    ds = FakeDataset()
    a = _take(build_train_loader(ds, batch_size=2, seed=5), 10)
    b = _take(build_train_loader(ds, batch_size=2, seed=5), 10)
    c = _take(build_train_loader(ds, batch_size=2, seed=6), 10)
    assert a == b and a != c


def test_resume_matches_uninterrupted_run():
    ds = FakeDataset()
    full = _take(build_train_loader(ds, batch_size=2, seed=3), 25)
    resumed = _take(build_train_loader(ds, batch_size=2, seed=3, start_iter=17), 8)
    assert resumed == full[17:]


def test_augmentation_rng_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _take(build_train_loader(FakeDataset(), batch_size=2), 3)
    assert torch.equal(torch.rand(3), expected)


def test_workers_give_the_same_batches():
    ds = FakeDataset()
    serial = _take(build_train_loader(ds, batch_size=2, seed=2), 6)
    parallel = _take(build_train_loader(ds, batch_size=2, seed=2, num_workers=1), 6)
    assert serial == parallel


def test_subset_groups():
    ds = FakeDataset(6)
    assert aspect_ratio_groups(ds).tolist() == [1, 0, 0, 1, 0, 0]
    assert aspect_ratio_groups(Subset(ds, [0, 1])).tolist() == [1, 0]


def test_test_loader_is_ordered_and_finite():
    ds = FakeDataset(5)
    batches = list(build_test_loader(ds, batch_size=2))
    assert [len(images) for images, _ in batches] == [2, 2, 1]
    assert [t["index"] for _, targets in batches for t in targets] == [0, 1, 2, 3, 4]
