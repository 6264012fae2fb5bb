"""The sweep-line self-intersection test agrees with testing every pair of edges, on hard cases and at scale."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from maskrcnn.data.polygons import collinear, distinct_vertices, polygon_self_intersects


def _cross(o, a, b):
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])


def _within_box(p, q, r):
    lo, hi = np.minimum(p, q), np.maximum(p, q)
    return np.all((lo <= r) & (r <= hi), axis=-1)


def brute_force(points) -> bool:
    """check-dataset's earlier test, kept as the reference: every pair of non-adjacent edges, O(n^2)."""
    p = distinct_vertices(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    n = len(p)
    if n < 3:
        return False
    nxt = np.concatenate([p[1:], p[:1]])
    u, v = np.concatenate([p[-1:], p[:-1]]) - p, nxt - p
    if np.any((u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0] == 0) & ((u * v).sum(axis=1) > 0)):
        return True
    if n < 4:
        return False
    i, j = np.nonzero(np.triu(np.ones((n, n), bool), k=2))
    keep = ~((i == 0) & (j == n - 1))
    i, j = i[keep], j[keep]
    a, b, c, d = p[i], nxt[i], p[j], nxt[j]
    d1, d2 = _cross(c, d, a), _cross(c, d, b)
    d3, d4 = _cross(a, b, c), _cross(a, b, d)
    crossing = (np.sign(d1) * np.sign(d2) < 0) & (np.sign(d3) * np.sign(d4) < 0)
    touching = (((d1 == 0) & _within_box(c, d, a)) | ((d2 == 0) & _within_box(c, d, b))
                | ((d3 == 0) & _within_box(a, b, c)) | ((d4 == 0) & _within_box(a, b, d)))
    return bool((crossing | touching).any())


HAND_MADE = {
    "square": ([[0, 0], [4, 0], [4, 4], [0, 4]], False),
    "concave": ([[0, 0], [4, 0], [4, 4], [2, 1], [0, 4]], False),
    "redundant points": ([[0, 0], [2, 0], [4, 0], [4, 4], [0, 4], [0, 0]], False),
    "bow tie": ([[0, 0], [4, 4], [4, 0], [0, 4]], True),
    "vertex on an edge": ([[0, 0], [4, 0], [4, 4], [2, 0], [0, 4]], True),
    "folds back": ([[0, 0], [4, 0], [2, 0], [2, 3]], True),
    "figure eight through a shared vertex": ([[0, 0], [2, 2], [4, 0], [4, 4], [2, 2], [0, 4]], True),
    "two squares touching at a corner": ([[0, 0], [2, 0], [2, 2], [4, 2], [4, 4], [2, 4], [2, 2], [0, 2]], True),
    "collinear overlapping edges": ([[0, 0], [6, 0], [6, 2], [4, 2], [4, 0], [2, 0], [2, -2], [0, -2]], True),
    "a V-shaped notch": ([[0, 0], [6, 0], [6, 4], [3, 4], [3, 0.0 + 2], [2, 4], [0, 4]], False),
    "keyhole: a hole joined by a bridge walked twice": (
        [[0, 0], [10, 0], [10, 10], [0, 10], [0, 5], [3, 5], [3, 7], [7, 7], [7, 3], [3, 3], [3, 5], [0, 5]], True),
    "spike": ([[0, 0], [4, 0], [4, 4], [2, 4], [2, 8], [2, 4], [0, 4]], True),
    "vertical edges in a comb": (
        [[0, 0], [1, 0], [1, 3], [2, 3], [2, 0], [3, 0], [3, 3], [4, 3], [4, 4], [0, 4]], False),
    "comb with a notch": ([[0, 0], [1, 0], [1, 3], [2, 3], [2, 0], [3, 0], [3, 3], [4, 3], [4, 4], [1, 4],
                                  [1, 3.5], [0.5, 4], [0, 4]], False),
    "horizontal edges on one line, apart": ([[0, 0], [2, 0], [2, 1], [3, 1], [3, 0], [5, 0], [5, 2], [0, 2]], False),
    "horizontal edges on one line, overlapping": (
        [[0, 0], [3, 0], [3, 1], [2, 1], [2, 0], [5, 0], [5, 2], [0, 2]], True),
    "triangle": ([[0, 0], [1, 0], [0, 1]], False),
    "all on a line": ([[0, 0], [1, 0], [2, 0], [3, 0]], True),
}


@pytest.mark.parametrize("name", HAND_MADE)
def test_hand_made(name):
    points, expected = HAND_MADE[name]
    assert brute_force(points) == expected, "the reference itself"
    for method in ("sweep", "pairwise", "auto"):
        assert polygon_self_intersects(np.array(points, dtype=float), method=method) == expected
    # the same verdict whatever the starting vertex, direction and mirror image
    p = np.array(points, dtype=float)
    for shift in range(len(p)):
        for q in (np.roll(p, shift, axis=0), np.roll(p[::-1], shift, axis=0), np.roll(p * [-1, 1], shift, axis=0),
                  np.roll(p[:, ::-1], shift, axis=0)):
            assert polygon_self_intersects(q, method="sweep") == expected


def _random_polygons(rng: np.random.Generator):
    """Small polygons where degenerate cases are common: grid points, axis-aligned walks, spikes."""
    for _ in range(1500):  # a few points on a tiny grid: shared vertices, collinear overlaps, touches
        n = int(rng.integers(3, 10))
        yield rng.integers(0, int(rng.integers(2, 6)), (n, 2)).astype(float)
    for _ in range(600):  # axis-aligned walks: vertical and horizontal edges on shared lines
        steps = rng.integers(-2, 3, (int(rng.integers(3, 14)), 2)) * (rng.random((1, 2)) < 0.5)
        steps[:, 0] *= rng.random(len(steps)) < 0.5
        yield np.cumsum(steps, axis=0).astype(float)
    for _ in range(300):  # star-shaped (simple) with a vertex sometimes pushed onto another edge
        n = int(rng.integers(4, 40))
        theta = np.sort(rng.uniform(0, 2 * math.pi, n))
        p = np.round(np.stack([np.cos(theta), np.sin(theta)], 1) * rng.uniform(5, 20, (n, 1)))
        if rng.random() < 0.5:
            i, j = rng.integers(0, n, 2)
            p[i] = (p[j] + p[(j + 1) % n]) / 2
        yield p
    for _ in range(300):  # random floats: crossings in general position
        yield rng.uniform(-1, 1, (int(rng.integers(3, 12)), 2))


def test_agrees_with_every_pair_on_random_polygons():
    rng = np.random.default_rng(0)
    verdicts = []
    for p in _random_polygons(rng):
        expected = brute_force(p)
        assert polygon_self_intersects(p, method="sweep") == expected, p.tolist()
        assert polygon_self_intersects(p, method="pairwise") == expected, p.tolist()
        verdicts.append(expected)
    assert 0.2 < np.mean(verdicts) < 0.8  # both verdicts well represented


def _wavy_contour(n: int, seed: int = 0) -> np.ndarray:
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    rad = 1500 + 400 * np.sin(7 * theta) + np.random.default_rng(seed).uniform(-2, 2, n)
    return np.round(np.stack([2000 + rad * np.cos(theta), 2000 + rad * np.sin(theta)], 1), 2)


def test_large_contours_quickly():
    p = _wavy_contour(50_000)
    start = time.perf_counter()
    assert not polygon_self_intersects(p)
    assert time.perf_counter() - start < 20  # the pairwise test needed 2.3 GiB and minutes here
    q = p.copy()
    q[30_000] = q[10_000] + [0.0, 0.005]  # a spike reaching across to the other side: crossings
    q[30_000] = (q[10_000] + q[10_001]) / 2  # exactly on an edge far along the contour
    assert polygon_self_intersects(q)
    assert brute_force(q[::100].tolist() + [q[30_000].tolist()]) == polygon_self_intersects(
        np.array(q[::100].tolist() + [q[30_000].tolist()]))


@pytest.mark.parametrize("points, atol, expected", [
    ([[1, 1], [5, 5], [9, 9]], 0.0, True),  # on one line
    ([[2, 2], [2, 2], [2, 2]], 0.0, True),  # one point
    ([[0, 0], [4, 0], [4, 3]], 0.0, False),  # a triangle
    ([[0, 0], [1, 1e-12], [2, 0]], 0.0, False),  # off the line by a hair: exact says it has an interior
    ([[0, 0], [1, 1e-12], [2, 0]], 1e-9, True),  # ... the converters' tolerance forgives it
    ([[0, 0], [float("nan"), 1], [2, 0]], 1e-9, False),  # NaN is never collinear
])
def test_collinear(points, atol, expected):
    assert collinear(np.array(points, dtype=float), atol=atol) is expected
