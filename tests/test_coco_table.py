"""The compact annotation table: the same records as the per-annotation loader, its cache, its JSON stream."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn.data import coco_table
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.coco_checks import (BAD_BOX, EMPTY_MASK, NON_FINITE, ZERO_AREA_BOX, check_schema,
                                       prepare_segmentation)
from maskrcnn.data.figures import make_figures
from maskrcnn.data.jsonfile import stream_members
from maskrcnn.data.shapes import make_shapes
from maskrcnn.errors import UserError
from support import uncompressed_rle, write_coco_dataset


# ---- the per-annotation checks, one annotation at a time: the oracle the vectorised table is held to ----


def _prepare(ref: CocoDataset, ann: dict, img: dict, label_of: dict[int, int]) -> dict | None:
    """The usable form of one annotation, or None (counting why in `ref.skipped`) if it is degenerate."""
    h, w = int(img["height"]), int(img["width"])
    seg, mask_box, reason = prepare_segmentation(ann.get("segmentation"), h, w)
    if reason is None:
        box, reason = _prepare_box(ref, ann.get("bbox"), mask_box, h, w)
    if reason is not None:
        ref.skipped[reason] += 1
        return None
    record = {"box": box, "label": label_of[ann["category_id"]], "iscrowd": int(ann["iscrowd"]), "segmentation": seg}
    if ref.num_keypoints:
        record["keypoints"] = _prepare_keypoints(ref, ann.get("keypoints"))
    return record


def _prepare_keypoints(ref: CocoDataset, values) -> np.ndarray:
    """[K, 3] float32 keypoints moved to pixel centres (+0.5); unlabelled or malformed ones all zero."""
    k = ref.num_keypoints
    out = np.zeros((k, 3), dtype=np.float32)
    if values is None or (isinstance(values, list) and not values):
        return out
    if (not isinstance(values, list) or len(values) != 3 * k
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not all(math.isfinite(v) for v in values)):
        ref.bad_keypoints += 1
        return out
    points = np.asarray(values, dtype=np.float32).reshape(k, 3)
    labelled = points[:, 2] > 0
    out[labelled, :2] = points[labelled, :2] + 0.5
    out[labelled, 2] = points[labelled, 2]
    return out


def _prepare_box(ref: CocoDataset, bbox, mask_box: list[float], h: int, w: int) -> tuple[list[float], str | None]:
    """The xyxy box clipped to the image (from the mask if bbox is absent) and a skip reason."""
    if bbox is None:
        x1, y1, x2, y2 = mask_box
    else:
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return [], BAD_BOX
        if not all(isinstance(v, (int, float)) for v in bbox):
            return [], BAD_BOX
        if not all(math.isfinite(v) for v in bbox):
            return [], NON_FINITE
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            return [], ZERO_AREA_BOX
        x1, y1, x2, y2 = x, y, x + bw, y + bh
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 <= x1 or y2 <= y1:
        return [], EMPTY_MASK
    ref.boxes_from_masks += bbox is None
    return [x1, y1, x2, y2], None


def reference(ann_file: Path, filter_empty: bool = True, train: bool = False, min_keypoints: int = 1):
    """Return what the per-annotation loader makes of `ann_file`: image infos, their records and the counts.

    The per-annotation checks `CocoDataset.__init__` applied before the table (`_prepare` below), one
    annotation at a time to the parsed JSON.
    """
    data = json.loads(ann_file.read_text())
    image_by_id = check_schema(data, ann_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    with_keypoints = [c for c in categories if isinstance(c.get("keypoints"), list) and c["keypoints"]]
    ref = object.__new__(CocoDataset)
    ref.num_keypoints = len(with_keypoints[0]["keypoints"]) if with_keypoints else 0
    ref.skipped, ref.bad_keypoints, ref.boxes_from_masks = Counter(), 0, 0
    by_image: dict[int, list] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        record = _prepare(ref, ann, image_by_id[ann["image_id"]], label_of)
        if record is not None:
            by_image[ann["image_id"]].append(record)
    infos, records = [], []
    for img in data["images"]:
        recs = by_image[img["id"]]
        if filter_empty and not any(r["iscrowd"] == 0 for r in recs):
            continue
        if filter_empty and train and ref.num_keypoints and sum(
                int((r["keypoints"][:, 2] > 0).sum()) for r in recs if r["iscrowd"] == 0) < min_keypoints:
            continue
        infos.append({k: img[k] for k in ("id", "file_name", "height", "width")})
        records.append(recs)
    return infos, records, ref.skipped, ref.boxes_from_masks, ref.bad_keypoints


def assert_same_as_reference(ds: CocoDataset, **kwargs) -> None:
    infos, records, skipped, derived, bad_keypoints = reference(ds.ann_file, **kwargs)
    assert ds.image_ids == [i["id"] for i in infos]
    assert ds.image_sizes == [(i["height"], i["width"]) for i in infos]
    assert (dict(ds.skipped), ds.boxes_from_masks, ds.bad_keypoints) == (dict(skipped), derived, bad_keypoints)
    for index, (info, expected) in enumerate(zip(infos, records)):
        got_info, got = ds._image_records(index)
        assert got_info == info
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.keys() == b.keys()
            assert (a["box"], a["label"], a["iscrowd"], a["segmentation"]) == (
                b["box"], b["label"], b["iscrowd"], b["segmentation"])
            assert all(type(x) is float for x in a["box"])
            if "keypoints" in b:
                assert a["keypoints"].dtype == b["keypoints"].dtype and np.array_equal(a["keypoints"], b["keypoints"])


def test_hand_written_fixture(tmp_path):
    ann_file, image_dir = write_coco_dataset(tmp_path)
    for kwargs in ({}, {"filter_empty": False}):
        assert_same_as_reference(CocoDataset(ann_file, image_dir, **kwargs), **kwargs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under NumPy 2 (harmless)
def test_shapes_data_and_its_targets(tmp_path):
    """The shapes generator's files (polygons and RLEs): same records, and the same images and targets."""
    files = make_shapes(tmp_path, num_train=6, num_val=2, seed=1)
    ann_file, image_dir = files["train"]
    ds = CocoDataset(ann_file, image_dir)
    assert_same_as_reference(ds)
    _, records, *_ = reference(ann_file)
    for index in range(len(ds)):
        _, target = ds[index]
        h, w = target["masks"].shape[1:]
        rles = [mask_utils.merge(mask_utils.frPyObjects(r["segmentation"], h, w))
                if isinstance(r["segmentation"], list) else r["segmentation"] for r in records[index]]
        expected = np.stack([mask_utils.decode(rle) for rle in rles])
        assert np.array_equal(target["masks"].to_dense().numpy(), expected)
        assert target["boxes"].tolist() == [[float(np.float32(v)) for v in r["box"]] for r in records[index]]


def test_keypoint_file_with_malformed_keypoints(tmp_path):
    files = make_figures(tmp_path, num_train=10, num_val=1, seed=2, image_size=(96, 128))
    ann_file, image_dir = files["train"]
    data = json.loads(ann_file.read_text())
    anns = data["annotations"]
    anns[0]["keypoints"] = anns[0]["keypoints"][:-3]  # too short
    anns[1]["keypoints"][4] = "x"
    anns[2]["keypoints"][3] = True
    anns[3]["keypoints"][0] = float("nan")
    anns[4]["keypoints"] = []
    anns[5].pop("keypoints")
    anns[6]["keypoints"] = {"x": 1}
    anns[7]["keypoints"][2::3] = [0] * 17  # none labelled: the image may drop out with min_keypoints
    ann_file.write_text(json.dumps(data))
    for kwargs in ({}, {"train": True}, {"train": True, "min_keypoints": 30}, {"filter_empty": False}):
        ds = CocoDataset(ann_file, image_dir, **kwargs)
        assert ds.num_keypoints == 17 and ds.bad_keypoints >= 4
        assert_same_as_reference(ds, **kwargs)


def _odd_annotation(rng: np.random.Generator, h: int, w: int) -> dict:
    """One annotation from a menu of good, degenerate and malformed forms (each skip reason included)."""
    def poly(n=None, scale=1.0, offset=0.0):
        n = n or int(rng.integers(3, 8))
        return np.round(rng.uniform(0, 1, (n, 2)) * [w * scale, h * scale] + offset, 2).reshape(-1).tolist()

    mask = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
    mask[y:y + 2, x:x + 3] = 1
    segs = [
        lambda: [poly()], lambda: [poly(), poly()], lambda: [poly(), [1, 2, 3, 4]], lambda: [poly(4, 1e3, -5e2)],
        lambda: [poly(5, 40, -20 * max(h, w))], lambda: [[1, 1, 1, 1, 1, 1]], lambda: [[0, 0, 2, 2, 4, 4]],
        lambda: [[0, 0, 4, 4, 4, 0, 0, 4]], lambda: [[-5, -5, -1, -5, -1, -1]], lambda: [[1, 2, 3]],
        lambda: [poly()[:-1]], lambda: [[1, "2", 3, 4, 5, 6]], lambda: [[1, None, 3, 4, 5, 6]],
        lambda: [[1, [2], 3, 4, 5, 6]], lambda: [[1, float("nan"), 3, 4, 5, 6]],
        lambda: [[1, float("inf"), 3, 4, 5, 6]],
        lambda: [[True, 1, 5, 1, 5, 5]], lambda: [poly(), "x"], lambda: None, lambda: [], lambda: {}, lambda: 7,
        lambda: [[1e12, 1e12, -1e12, 1e12, 0, -1e12]], lambda: [[0, 0, 3, 0, 1e9, 3]],
        lambda: uncompressed_rle(mask), lambda: {"size": [h, w], "counts": mask_utils.encode(
            np.asfortranarray(mask))["counts"].decode()},
        lambda: uncompressed_rle(np.zeros((h, w), np.uint8)), lambda: {"size": [h + 1, w], "counts": [h * w]},
        lambda: {"size": [h, w], "counts": [h * w - 1]}, lambda: {"size": [h, w], "counts": "#"},
        lambda: {"size": [h, w]}, lambda: {"size": [h, w], "counts": [1.5, h * w - 1.5]},
    ]
    boxes = [
        lambda: None, lambda: [1, 1, 3, 3], lambda: [1.5, 2.25, w, h], lambda: [-3, -3, 2, 2], lambda: [1, 1, 0, 3],
        lambda: [1, 1, 3], lambda: [1, "1", 3, 3], lambda: [1, 1, float("nan"), 3], lambda: "box",
        lambda: [w + 1, 0, 2, 2], lambda: [True, 0, 2, 2],
    ]
    ann = {"segmentation": segs[rng.integers(len(segs))](), "iscrowd": int(rng.random() < 0.15)}
    box = boxes[rng.integers(len(boxes))]()
    if box is not None or rng.random() < 0.5:
        ann["bbox"] = box
    if ann["segmentation"] is None and rng.random() < 0.5:
        del ann["segmentation"]
    return ann


def _odd_file(root: Path, seed: int, n: int = 600) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + i, "file_name": f"{i}.jpg", "width": int(rng.integers(8, 40)),
               "height": int(rng.integers(8, 40))} for i in range(25)]
    anns = []
    for k in range(n):
        img = images[rng.integers(len(images))]
        ann = _odd_annotation(rng, img["height"], img["width"])
        ann.update(image_id=img["id"], category_id=int(rng.choice([5, 2, 9])))
        if rng.random() < 0.9:
            ann["id"] = 1000 + k
        anns.append(ann)
    data = {"info": {}, "images": images, "annotations": anns,
            "categories": [{"id": 9, "name": "c"}, {"id": 2, "name": "a"}, {"id": 5, "name": "b"}]}
    (root / "images").mkdir(exist_ok=True)
    path = root / f"odd{seed}.json"
    path.write_text(json.dumps(data))
    return path, root / "images"


@pytest.mark.parametrize("seed", range(4))
def test_degenerate_and_malformed_annotations(tmp_path, seed, caplog):
    ann_file, image_dir = _odd_file(tmp_path, seed)
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.coco"):
        ds = CocoDataset(ann_file, image_dir, filter_empty=bool(seed % 2))
    assert_same_as_reference(ds, filter_empty=bool(seed % 2))
    assert len(ds.skipped) >= 6  # the menu reaches most skip reasons
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{ann_file}: skipped {sum(ds.skipped.values())} of 600 annotations")


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["annotations"][3].update(image_id=999), "annotations[3] refers to image_id 999"),
    (lambda d: d["annotations"][5].update(category_id=4), "annotations[5] has category_id 4"),
    (lambda d: d["annotations"][7].update(id=d["annotations"][2]["id"]),
     "annotations[7] has a non-integer or repeated"),
    (lambda d: d["annotations"][4].update(iscrowd=2), "annotations[4] has iscrowd 2"),
    (lambda d: d["annotations"][4].pop("category_id"), "annotations[4] is missing 'category_id'"),
    (lambda d: d["images"][1].pop("width"), "images[1] is missing 'width'"),
    (lambda d: d.update(annotations="x"), "'annotations' must be a list, got str"),
    (lambda d: d.pop("categories"), "has no 'categories' list"),
])
def test_schema_errors_as_before(tmp_path, edit, words):
    ann_file, image_dir = _odd_file(tmp_path, 0, n=20)
    data = json.loads(ann_file.read_text())
    for i, ann in enumerate(data["annotations"]):
        ann["id"] = i + 1
    edit(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(UserError) as new:
        CocoDataset(ann_file, image_dir)
    with pytest.raises(UserError) as old:
        check_schema(json.loads(ann_file.read_text()), ann_file)
    assert str(new.value) == str(old.value) and words in str(new.value)


def test_evaluation_index_is_built_on_first_use(tmp_path):
    ann_file, image_dir = write_coco_dataset(tmp_path)
    ds = CocoDataset(ann_file, image_dir)
    assert ds._coco is None
    assert sorted(ds.coco.getAnnIds()) == list(range(1, 10)) and ds.coco is ds.coco


def test_cache_hit_change_and_damage(tmp_path, monkeypatch, caplog):
    ann_file, image_dir = write_coco_dataset(tmp_path)
    cache = tmp_path / "cache"
    first = CocoDataset(ann_file, image_dir, cache_dir=cache)
    (cached,) = cache.glob("*.npz")
    assert not list(cache.glob("*.tmp"))  # the temporary file was renamed

    parses = []
    real_parse = coco_table.parse_table
    monkeypatch.setattr(coco_table, "parse_table", lambda p: parses.append(p) or real_parse(p))
    again = CocoDataset(ann_file, image_dir, cache_dir=cache)
    assert parses == []  # read back, not parsed
    assert_same_as_reference(again)
    assert [again._image_records(i) for i in range(len(again))].__repr__() == \
        [first._image_records(i) for i in range(len(first))].__repr__()

    data = json.loads(ann_file.read_text())  # an edited file has another key: parsed afresh
    data["annotations"][0]["segmentation"] = [[2, 2, 6, 2, 6, 8, 2, 8]]
    ann_file.write_text(json.dumps(data))
    edited = CocoDataset(ann_file, image_dir, cache_dir=cache)
    assert len(parses) == 1
    assert edited._image_records(0)[1][0]["segmentation"] == [[2.0, 2.0, 6.0, 2.0, 6.0, 8.0, 2.0, 8.0]]
    assert len(list(cache.glob("*.npz"))) == 2

    for damage in (b"not a zip file", cached.read_bytes()[: len(cached.read_bytes()) // 2]):
        newest = max(cache.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        newest.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="maskrcnn.data.coco_table"):
            ds = CocoDataset(ann_file, image_dir, cache_dir=cache)
        warnings = [r.getMessage() for r in caplog.records if r.name == "maskrcnn.data.coco_table"]
        assert len(warnings) == 1 and "ignoring the annotation cache" in warnings[0] and "\n" not in warnings[0]
        assert_same_as_reference(ds)
        assert coco_table.AnnotationTable.load(newest).meta["num_annotations"] == 9  # rewritten whole


def test_cache_from_another_format_is_ignored(tmp_path, monkeypatch, caplog):
    ann_file, image_dir = write_coco_dataset(tmp_path)
    CocoDataset(ann_file, image_dir, cache_dir=tmp_path / "c")
    monkeypatch.setattr(coco_table, "FORMAT", coco_table.FORMAT + 1)
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.coco_table"):
        assert_same_as_reference(CocoDataset(ann_file, image_dir, cache_dir=tmp_path / "c"))
    assert any("format 1, expected 2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text", [
    '{"a": [1, 2, {"b": [3]}], "annotations": [ {"x": 1} ,{"y": [2]}\n], "c": null}',
    ' {\n"annotations" : [ ] , "d": {"annotations": [1]} } \n', '{}', '{"annotations": null}',
    '{"annotations": [NaN, Infinity, -1e400]}', '{"annotations": {"a": 1}}', '[1, 2]', '3',
])
def test_stream_members_agrees_with_json_loads(text):
    items = []
    members = stream_members(text, {"annotations": lambda i, v: items.append((i, v))})
    expected = json.loads(text)
    if isinstance(expected, dict) and isinstance(expected.get("annotations"), list):
        assert repr(items) == repr(list(enumerate(expected["annotations"])))
        expected["annotations"] = []
    assert repr(members) == repr(expected)


@pytest.mark.parametrize("text", [
    '', '{', '{"annotations": [1, 2', '{"annotations": [1 2]}', '{"annotations": [1,]}', '{"a" 1}', '{"a": 1,}',
    '{"a": 1} x', '{"annotations": [{"a": tru}]}', '{1: 2}', '{"annotations": [1]\n\n  , 3}',
])
def test_stream_members_errors_match_json(text):
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        stream_members(text, {"annotations": lambda i, v: None})
    assert (got.value.msg, got.value.lineno, got.value.colno) == (expected.value.msg, expected.value.lineno,
                                                                 expected.value.colno)


def test_unwritable_cache_warns_and_loads(tmp_path, caplog):
    ann_file, image_dir = write_coco_dataset(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.coco_table"):
        ds = CocoDataset(ann_file, image_dir, cache_dir=blocker)
    assert_same_as_reference(ds)
    assert any("cannot write the annotation cache" in r.getMessage() for r in caplog.records)


def test_ids_beyond_64_bits_are_one_line_errors(tmp_path):
    ann_file, image_dir = write_coco_dataset(tmp_path)
    data = json.loads(ann_file.read_text())
    data["images"][2]["id"] = 2**70  # an image no annotation refers to
    ann_file.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"image or category id beyond 64 bits \(1180591620717411303424\)"):
        CocoDataset(ann_file, image_dir)
    data["annotations"][1]["id"] = -2**64
    data["images"][2]["id"] = 12
    ann_file.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"annotations\[1\] has an id beyond 64 bits"):
        CocoDataset(ann_file, image_dir)
