"""Property and fuzz tests (hypothesis): box coding, IoU, masks against pycocotools, flips, the COCO loader."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.coco import CocoDataset, _decode_masks
from maskrcnn.data.coco_checks import prepare_segmentation
from maskrcnn.data.transforms import hflip
from maskrcnn.engine.coco_results import predictions_to_coco
from maskrcnn.errors import UserError
from maskrcnn.rle import rle_counts
from maskrcnn.structures import BoxCoder, box_area, pairwise_iou

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- boxes --------------------------------------------------------------------------------------


@st.composite
def boxes(draw, n_min: int = 1, n_max: int = 6, lo: float = -50.0, hi: float = 500.0, min_side: float = 0.5):
    """Draw an [N,4] float64 tensor of xyxy boxes with sides of at least `min_side`."""
    n = draw(st.integers(n_min, n_max))
    coord = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    side = st.floats(min_side, 300.0, allow_nan=False, allow_infinity=False)
    rows = []
    for _ in range(n):
        x, y, w, h = draw(coord), draw(coord), draw(side), draw(side)
        rows.append([x, y, x + w, y + h])
    return torch.tensor(rows, dtype=torch.float64)


@FAST
@given(data=st.data(), weights=st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0)]))
def test_box_encode_decode_round_trip(data, weights):
    refs = data.draw(boxes())
    n = len(refs)
    # Targets within the coder's clamp (log-scale change below ln(1000/16)) so decode can undo encode.
    targets = data.draw(boxes(n_min=n, n_max=n, min_side=0.5))
    ratio_w = (targets[:, 2] - targets[:, 0]) / (refs[:, 2] - refs[:, 0])
    ratio_h = (targets[:, 3] - targets[:, 1]) / (refs[:, 3] - refs[:, 1])
    assume(bool((ratio_w < 60).all() and (ratio_h < 60).all()))
    coder = BoxCoder(weights)
    deltas = coder.encode(targets, refs)
    assert torch.isfinite(deltas).all()
    decoded = coder.decode(deltas, refs)[:, 0]
    torch.testing.assert_close(decoded, targets, rtol=1e-9, atol=1e-6)


@FAST
@given(refs=boxes())
def test_box_coder_zero_deltas_give_the_reference_box(refs):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.decode(torch.zeros(len(refs), 8, dtype=torch.float64), refs),
                               refs[:, None].expand(-1, 2, -1), rtol=1e-12, atol=1e-9)


@FAST
@given(a=boxes(n_max=8, min_side=0.0), b=boxes(n_max=8, min_side=0.0))
@example(a=torch.zeros(1, 4, dtype=torch.float64),  # found by CI: b's area underflows to 0
         b=torch.tensor([[0.0, 0.0, 1.4255e-98, 1.1125e-308]], dtype=torch.float64))
def test_pairwise_iou_symmetric_and_bounded(a, b):
    iou_ab = pairwise_iou(a, b)
    iou_ba = pairwise_iou(b, a)
    assert iou_ab.shape == (len(a), len(b))
    # Two empty boxes have IoU 0/0 (as torchvision's box_iou); every other pair must be a number in [0, 1].
    # Empty means zero area as computed: sides of 1e-98 and 1e-308 are positive, but their product is 0.
    empty_a, empty_b = box_area(a) == 0, box_area(b) == 0
    defined = ~(empty_a[:, None] & empty_b[None, :])
    assert torch.isfinite(iou_ab[defined]).all()
    assert (iou_ab[defined] >= 0).all() and (iou_ab[defined] <= 1 + 1e-12).all()
    torch.testing.assert_close(iou_ab[defined], iou_ba.T[defined], rtol=1e-12, atol=1e-12)


@FAST
@given(a=boxes(n_max=8, min_side=0.01))
def test_iou_of_a_box_with_itself_is_one(a):
    torch.testing.assert_close(torch.diagonal(pairwise_iou(a, a)), torch.ones(len(a), dtype=a.dtype))


@FAST
@given(a=boxes(n_max=4, min_side=0.5), shift=st.floats(1.0, 10.0))
def test_iou_of_disjoint_boxes_is_zero(a, shift):
    moved = a.clone()
    moved[:, [0, 2]] += a[:, 2].max() - a[:, 0].min() + shift  # every moved box lies right of every box
    assert (pairwise_iou(a, moved) == 0).all()


# ---- masks: our RLE / polygon handling against pycocotools ----------------------------------------


@st.composite
def masks(draw, max_side: int = 24):
    """Draw a uint8 HxW 0/1 mask, biased towards blobs (as object masks are) but any pattern allowed."""
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["random", "rect", "empty", "full"]))
    m = np.zeros((h, w), np.uint8)
    if kind == "random":
        seed = draw(st.integers(0, 2**32 - 1))
        m = (np.random.default_rng(seed).random((h, w)) < draw(st.floats(0.05, 0.95))).astype(np.uint8)
    elif kind == "rect":
        y1, x1 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        y2, x2 = draw(st.integers(y1 + 1, h)), draw(st.integers(x1 + 1, w))
        m[y1:y2, x1:x2] = 1
    elif kind == "full":
        m[:] = 1
    return m


def _uncompressed(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE counts)."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] == 1 else runs


@FAST
@given(mask=masks())
def test_rle_counts_decodes_pycocotools_strings(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    assert rle_counts(rle["counts"]) == _uncompressed(mask)


@FAST
@given(mask=masks())
def test_every_rle_form_prepares_and_decodes_to_the_same_mask(mask):
    h, w = mask.shape
    compressed = mask_utils.encode(np.asfortranarray(mask))
    forms = [
        {"size": [h, w], "counts": compressed["counts"].decode("ascii")},
        {"size": [h, w], "counts": _uncompressed(mask)},
    ]
    for seg in forms:
        rle, extent, reason = prepare_segmentation(seg, h, w)
        if not mask.any():
            assert reason is not None  # an empty mask is skipped, never trained on
            continue
        assert reason is None
        np.testing.assert_array_equal(_decode_masks([rle], h, w)[0], mask)
        x, y, bw, bh = mask_utils.toBbox(compressed)
        assert extent == [x, y, x + bw, y + bh]


@FAST
@given(mask=masks(), extra=st.integers(-5, 5).filter(lambda d: d != 0))
def test_rle_whose_runs_do_not_cover_the_image_is_skipped(mask, extra):
    h, w = mask.shape
    counts = _uncompressed(mask)
    counts[-1] += extra
    assume(counts[-1] >= 0)
    _, _, reason = prepare_segmentation({"size": [h, w], "counts": counts}, h, w)
    assert reason is not None


@st.composite
def polygons(draw, h: int = 32, w: int = 32, reach: float = 30.0):
    """Draw 1..2 polygons of 3..8 vertices, up to `reach` pixels beyond the image borders."""
    out = []
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.integers(3, 8))
        coord_x = st.floats(-reach, w + reach, allow_nan=False)
        coord_y = st.floats(-reach, h + reach, allow_nan=False)
        out.append([v for _ in range(k) for v in (draw(coord_x), draw(coord_y))])
    return out


@FAST
@given(polys=polygons())
def test_polygons_rasterise_as_pycocotools_does(polys):
    h, w = 32, 32
    seg, extent, reason = prepare_segmentation(polys, h, w)
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
    if reason is not None:
        # Skipped as degenerate or empty: then pycocotools' own mask is (nearly) empty too.
        assert expected.sum() <= 2 * sum(len(p) // 2 for p in polys)
        return
    ours = _decode_masks([seg], h, w)[0]
    # Within one image size of the borders nothing is clipped: exactly pycocotools' mask.
    np.testing.assert_array_equal(ours, expected)
    if ours.any():
        ys, xs = np.nonzero(ours)
        x1, y1, x2, y2 = extent
        assert xs.min() >= math.floor(x1) - 1 and xs.max() <= math.ceil(x2) + 1
        assert ys.min() >= math.floor(y1) - 1 and ys.max() <= math.ceil(y2) + 1


@FAST
@given(polys=polygons(reach=300.0))
def test_clipped_polygons_differ_from_pycocotools_by_edge_pixels_only(polys):
    # Vertices up to ~10 image sizes out: clipped by us, still cheap for pycocotools to compare with.
    h, w = 32, 32
    seg, _, reason = prepare_segmentation(polys, h, w)
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
    ours = _decode_masks([seg], h, w)[0] if reason is None else np.zeros_like(expected)
    # Clipping moves where edges are rasterised, never the inside: every pixel that differs touches an edge
    # (its centre within 1.5 px of one; a count bound fails on long slivers crossing the whole image).
    ys, xs = np.nonzero(ours != expected)
    if len(xs):
        assert _distance_to_edges(np.stack([xs + 0.5, ys + 0.5], 1), polys).max() <= 1.5


def _distance_to_edges(points: np.ndarray, polys: list[list[float]]) -> np.ndarray:
    """Each point's distance to the nearest edge of any of the closed polygons (flat x, y lists)."""
    nearest = np.full(len(points), np.inf)
    for poly in polys:
        a = np.asarray(poly, dtype=float).reshape(-1, 2)
        b = np.roll(a, -1, axis=0)
        ab = b - a
        t = ((points[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12)
        closest = a + np.clip(t, 0, 1)[..., None] * ab
        nearest = np.minimum(nearest, np.linalg.norm(points[:, None] - closest, axis=-1).min(1))
    return nearest


@FAST
@given(polys=polygons(reach=1e12))
def test_polygons_with_absurd_coordinates_load_quickly(polys):
    # Unclipped, pycocotools would walk ~5e12 points along such an edge (minutes and all memory).
    h, w = 32, 32
    start = time.perf_counter()
    seg, _, reason = prepare_segmentation(polys, h, w)
    if reason is None:
        assert _decode_masks([seg], h, w).shape == (1, h, w)
    assert time.perf_counter() - start < 2.0


@FAST
@given(data=st.data())
def test_predictions_to_coco_masks_round_trip_through_pycocotools(data):
    h, w = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
    d = data.draw(st.integers(1, 4))
    seed = data.draw(st.integers(0, 2**32 - 1))
    stack = (np.random.default_rng(seed).random((d, h, w)) < 0.4).astype(np.uint8)
    output = {
        "boxes": torch.tensor([[0.0, 0.0, float(w), float(h)]] * d),
        "scores": torch.linspace(1.0, 0.5, d),
        "labels": torch.ones(d, dtype=torch.int64),
        "masks": torch.from_numpy(stack).bool(),
    }
    results = predictions_to_coco(output, image_id=3, category_ids=[7])
    assert len(results) == d
    for r, m in zip(results, stack):
        json.dumps(r)  # JSON-serialisable as written to predictions.json
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode("ascii")}
        np.testing.assert_array_equal(mask_utils.decode(rle), m)
        assert r["bbox"] == [0.0, 0.0, float(w), float(h)] and r["category_id"] == 7


# ---- horizontal flip ----------------------------------------------------------------------------


@st.composite
def flip_samples(draw):
    """Draw an image size, boxes inside it and, per box, a mask whose pixels lie within the box."""
    h, w = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    n = draw(st.integers(0, 4))
    boxes_, masks_ = [], []
    for _ in range(n):
        x1 = draw(st.floats(0, w - 1, allow_nan=False))
        y1 = draw(st.floats(0, h - 1, allow_nan=False))
        x2 = draw(st.floats(x1 + 0.5, w, allow_nan=False))
        y2 = draw(st.floats(y1 + 0.5, h, allow_nan=False))
        m = np.zeros((h, w), np.uint8)
        # Pixels whose whole square [c, c+1) lies in the box.
        c1, c2 = math.ceil(x1), math.floor(x2)
        r1, r2 = math.ceil(y1), math.floor(y2)
        if c2 > c1 and r2 > r1:
            seed = draw(st.integers(0, 2**16))
            m[r1:r2, c1:c2] = np.random.default_rng(seed).random((r2 - r1, c2 - c1)) < 0.6
        boxes_.append([x1, y1, x2, y2])
        masks_.append(m)
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    target = {
        "boxes": torch.tensor(boxes_, dtype=torch.float32).reshape(-1, 4),
        "masks": torch.from_numpy(np.stack(masks_) if masks_ else np.zeros((0, h, w), np.uint8)),
        "labels": torch.ones(n, dtype=torch.int64),
    }
    return image, target


@FAST
@given(sample=flip_samples())
def test_hflip_keeps_boxes_in_the_image_and_masks_inside_their_boxes(sample):
    image, target = sample
    h, w = image.shape[-2:]
    flipped_image, flipped = hflip(image, target)
    b = flipped["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 0] < b[:, 2]).all()
    torch.testing.assert_close(b[:, [1, 3]], target["boxes"][:, [1, 3]])
    for box, m in zip(b.tolist(), flipped["masks"].to_dense().numpy()):
        ys, xs = np.nonzero(m)
        if len(xs):  # every mask pixel's square lies within its flipped box
            assert xs.min() >= box[0] - 1e-4 and xs.max() + 1 <= box[2] + 1e-4
            assert ys.min() >= box[1] - 1e-4 and ys.max() + 1 <= box[3] + 1e-4
    torch.testing.assert_close(flipped_image[..., 0], image[..., -1])
    assert flipped["labels"] is target["labels"]


@FAST
@given(sample=flip_samples())
def test_hflip_twice_is_the_identity(sample):
    image, target = sample
    again_image, again = hflip(*hflip(image, target))
    assert torch.equal(again_image, image)
    torch.testing.assert_close(again["boxes"], target["boxes"], rtol=0, atol=1e-4)
    assert torch.equal(again["masks"].to_dense(), target["masks"])


# ---- fuzzing the COCO loader --------------------------------------------------------------------

IMAGES = [("a.png", 20, 16), ("b.png", 12, 24)]


def _valid_coco() -> dict:
    """A small valid COCO file using polygons, compressed and uncompressed RLE, crowd and boxes."""
    m = np.zeros((16, 20), np.uint8)
    m[2:6, 10:18] = 1
    compressed = mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii")
    return {
        "images": [{"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(IMAGES)],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 6], "iscrowd": 0, "area": 24,
             "segmentation": [[1, 1, 5, 1, 5, 7, 1, 7]]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [10, 2, 8, 4], "iscrowd": 0, "area": 32,
             "segmentation": {"size": [16, 20], "counts": compressed}},
            {"id": 3, "image_id": 2, "category_id": 7, "iscrowd": 1,
             "segmentation": {"size": [24, 12], "counts": [50, 20, 218]}},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [2, 3, 5, 9], "iscrowd": 0,
             "segmentation": [[2, 3, 7, 3, 7, 12, 2, 12], [3, 14, 6, 14, 6, 18]]},
        ],
    }


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2**31, 2**63, -(2**31)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["", "a.png", "0", "-1", "abc", "??", "\u00e9"]),
    st.lists(st.integers(-3, 40), max_size=9), st.lists(st.floats(-1e12, 1e12), max_size=9),
    st.dictionaries(st.sampled_from(["size", "counts", "id", "x"]), st.integers(-2, 30), max_size=3),
    st.just([[]]), st.just([[1, 2, "3", 4, 5, 6]]), st.just([[0, 0, 1e300, 0, 1e300, 1e300]]),
)


def _paths(node, prefix=()):
    """Yield the path of every value in a JSON tree (the root excluded)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _mutate(data: dict, path: tuple, action: str, junk) -> None:
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "replace":
        parent[last] = copy.deepcopy(junk)  # never mutate an object hypothesis may hand out again
    elif action == "wrap":  # a value where a list of it was expected, or the other way round
        parent[last] = [parent[last]]
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    elif action == "negate" and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
        parent[last] = -parent[last] * 10**12


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_images")
    for name, w, h in IMAGES:
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / name)
    return root


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_coco_file_loads_or_raises_user_error(data, image_dir, tmp_path_factory):
    coco = _valid_coco()
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        paths = list(_paths(coco))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["delete", "replace", "replace", "wrap", "duplicate", "negate"]),
                           label="action")
        _mutate(coco, path, action, data.draw(JUNK, label="junk"))
    ann_file = tmp_path_factory.mktemp("fuzz") / "ann.json"
    ann_file.write_text(json.dumps(coco))  # NaN/Infinity are written as Python's json reads them back
    filter_empty = data.draw(st.booleans(), label="filter_empty")
    try:
        ds = CocoDataset(ann_file, image_dir, filter_empty=filter_empty, train=True, flip_prob=0.5)
        for i in range(len(ds)):
            image, target = ds[i]
            n = len(target["labels"])
            assert target["boxes"].shape == (n, 4) and target["masks"].shape[0] == n
            assert target["masks"].shape[1:] == image.shape[1:]
            assert torch.isfinite(target["boxes"]).all()
            b = target["boxes"]
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= image.shape[2]).all() and (b[:, 0] < b[:, 2]).all()
            assert ((target["labels"] >= 1) & (target["labels"] <= len(ds.class_names))).all()
    except UserError as e:
        assert "\n" not in str(e)


# Values the fuzzer (and reading the loader) turned up: each crashed the loader with a TypeError,
# ValueError or OverflowError, fed pycocotools runs it does not check, or (the far-out vertex) made
# pycocotools allocate without bound until the process was killed or segfaulted.
@pytest.mark.parametrize("path, value", [
    (("images", 0, "id"), [1]),
    (("images", 0, "file_name"), 7),
    (("images", 0, "width"), 2**40),
    (("annotations", 0, "id"), [1]),
    (("annotations", 0, "image_id"), [1]),
    (("annotations", 0, "iscrowd"), "abc"),
    (("annotations", 0, "iscrowd"), float("inf")),
    (("annotations", 0, "segmentation"), [[1, 1, "5", 1, 5, 7, 1, 7]]),
    (("annotations", 0, "segmentation"), [[1, 1, 5, 1, 5, -1.4e13, 1, 7]]),  # kept, clipped
    (("annotations", 0, "bbox"), [1, 1, "4", 6]),
    (("annotations", 1, "segmentation", "counts"), "zzz"),
    (("annotations", 2, "segmentation", "size"), ["24", "a"]),
    (("annotations", 2, "segmentation", "counts"), [50, -20, 258]),
    (("annotations", 2, "segmentation", "counts"), [50, 20, 2180]),
    (("categories", 0, "name"), {"a": 1}),
])
def test_values_that_used_to_crash_the_loader(path, value, image_dir, tmp_path):
    coco = _valid_coco()
    _mutate(coco, path, "replace", value)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(coco))
    try:
        ds = CocoDataset(ann_file, image_dir)
        targets = [ds[i][1] for i in range(len(ds))]
    except UserError as e:
        assert "\n" not in str(e)
        return
    kept = sum(len(t["labels"]) for t in targets)
    if path == ("annotations", 0, "segmentation") and value[0][5] == -1.4e13:
        assert kept == 4 and targets[0]["masks"][0].any()  # a sliver reaching far out, clipped, kept
    else:
        assert kept < 4  # the bad annotation was skipped, never trained on with a garbage mask
