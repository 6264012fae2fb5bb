"""Synthetic shapes: deterministic, valid COCO, masks consistent with boxes, occlusion makes masks disjoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn.cli import main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.shapes import MIN_VISIBLE_PIXELS, make_shapes, render_image
from maskrcnn.errors import UserError

# pycocotools' decode trips a harmless NumPy 2 DeprecationWarning
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_train=30, num_val=5, seed=7)
    return out


def test_layout_and_categories(shapes_dir):
    for split, n in (("train", 30), ("val", 5)):
        data = json.loads((shapes_dir / f"{split}.json").read_text())
        assert len(data["images"]) == n and len(list((shapes_dir / split).glob("*.png"))) == n
        assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "square"), (2, "circle"), (3, "triangle")]
        assert all(160 <= im["width"] <= 256 and 160 <= im["height"] <= 256 for im in data["images"])


def test_deterministic_for_a_seed(shapes_dir, tmp_path):
    make_shapes(tmp_path / "a", num_train=4, num_val=2, seed=7)
    make_shapes(tmp_path / "b", num_train=3, num_val=2, seed=8)
    first = json.loads((shapes_dir / "train.json").read_text())
    again = json.loads((tmp_path / "a" / "train.json").read_text())
    assert again["images"] == first["images"][:4]
    assert again["annotations"] == [a for a in first["annotations"] if a["image_id"] <= 4]
    assert (tmp_path / "a" / "train" / "000002.png").read_bytes() == (shapes_dir / "train" / "000002.png").read_bytes()
    val_a = json.loads((tmp_path / "a" / "val.json").read_text())
    val_b = json.loads((tmp_path / "b" / "val.json").read_text())
    val = json.loads((shapes_dir / "val.json").read_text())
    assert val_a["images"] == val["images"][:2]  # val does not depend on how many train images there are
    assert val_b["annotations"] != [a for a in val["annotations"] if a["image_id"] <= 2]


def test_masks_boxes_and_areas_consistent_and_disjoint(shapes_dir):
    data = json.loads((shapes_dir / "train.json").read_text())
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        mask = mask_utils.decode(ann["segmentation"])
        assert mask.sum() >= MIN_VISIBLE_PIXELS and ann["area"] == mask.sum() and ann["iscrowd"] == 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        by_image.setdefault(ann["image_id"], []).append(mask)
    assert len(by_image) == 30  # every image has at least one shape
    for masks in by_image.values():
        assert np.stack(masks).sum(axis=0).max() <= 1  # occlusion leaves no pixel in two masks
        assert len(masks) <= 4


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def test_occlusion_happens():
    touching = 0
    for i in range(40):
        image, shapes = render_image(np.random.default_rng(i), 120, 120, max_shapes=4, shape_size=(30, 70))
        assert image.shape == (120, 120, 3) and image.dtype == np.uint8
        masks = [m for _, m in shapes]
        assert np.stack(masks).sum(axis=0).max() <= 1
        # shapes that overlapped now share a boundary: one mask's 1-pixel dilation meets the other
        touching += any((_dilate(a) & b).any() for j, a in enumerate(masks) for b in masks[j + 1 :])
    assert touching >= 5


def test_loads_as_coco_dataset(shapes_dir):
    ds = CocoDataset(shapes_dir / "train.json", shapes_dir / "train")
    assert len(ds) == 30 and ds.class_names == ["square", "circle", "triangle"]
    image, target = ds[0]
    assert target["masks"].shape[1:] == image.shape[1:] and (target["labels"] >= 1).all()


def test_fixed_size_and_bad_arguments(tmp_path):
    make_shapes(tmp_path, num_train=2, num_val=0, seed=0, image_size=64)
    data = json.loads((tmp_path / "train.json").read_text())
    assert all(im["width"] == 64 == im["height"] for im in data["images"])
    with pytest.raises(UserError, match="image size"):
        make_shapes(tmp_path, 1, 1, 0, image_size=8)


def test_cli(tmp_path, capsys):
    assert main(["make-shapes", "--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "96"]) == 0
    out = capsys.readouterr().out
    assert "data.train=" in out and (tmp_path / "val.json").exists()
    assert main(["make-shapes", "--out", str(tmp_path), "--size", "4"]) == 2
