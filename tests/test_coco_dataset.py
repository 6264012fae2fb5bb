"""CocoDataset on hand-written COCO JSON: every segmentation form, crowd, empties, degenerates, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.coco import CocoDataset, build_dataset, concat_datasets, parse_data_spec
from maskrcnn.errors import UserError
from maskrcnn.instance_masks import InstanceMasks
from support import RLE_MASK, CROWD_MASK, PORTRAIT_MASK, uncompressed_rle, write_coco_dataset

@pytest.fixture
def files(tmp_path):
    return write_coco_dataset(tmp_path)


def test_categories_mapped_to_contiguous_labels_and_back(files):
    ds = CocoDataset(*files)
    assert ds.category_ids == [3, 7, 90]
    assert ds.class_names == ["cat", "dog", "zebra"]
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 2, 3]
    assert [ds.category_ids[label - 1] for label in target["labels"].tolist()] == [3, 7, 90]


def test_target_types_and_all_segmentation_forms(files):
    ds = CocoDataset(*files)
    image, target = ds[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32
    assert target["image_id"] == 10 and target["file_name"].endswith("a.png")
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # Masks come as per-instance crops (InstanceMasks), each no larger than its object's extent.
    assert isinstance(target["masks"], InstanceMasks) and target["masks"].shape == (3, 16, 20)
    assert target["masks"].regions[:2].tolist() == [[1, 1, 6, 4], [2, 10, 4, 8]]
    assert target["iscrowd"].tolist() == [0, 0, 1]
    # COCO xywh -> xyxy
    assert target["boxes"].tolist() == [[1, 1, 5, 7], [10, 2, 18, 6], [0, 10, 20, 16]]
    masks = target["masks"].to_dense().numpy()
    assert masks.dtype == np.uint8 and masks[0, 1:7, 1:5].all() and masks[0].sum() < 16 * 20 / 4  # polygon
    np.testing.assert_array_equal(masks[1], RLE_MASK)  # compressed RLE (string counts)
    np.testing.assert_array_equal(masks[2], CROWD_MASK)  # uncompressed RLE (counts list)


def test_missing_bbox_derived_from_mask(files):
    ds = CocoDataset(*files)
    _, target = ds[1]
    assert target["image_id"] == 11
    assert target["labels"].tolist() == [3]  # only the RLE survives; the rest are degenerate
    assert target["boxes"].tolist() == [[2, 4, 8, 20]]
    np.testing.assert_array_equal(target["masks"].to_dense()[0].numpy(), PORTRAIT_MASK)
    assert ds.boxes_from_masks == 1


def test_degenerate_annotations_skipped_and_reported_once(files, caplog):
    with caplog.at_level(logging.WARNING, logger="maskrcnn.data.coco"):
        ds = CocoDataset(*files)
    assert dict(ds.skipped) == {
        "zero-area box": 1,
        "polygon with < 3 points": 1,
        "empty mask or outside the image": 2,
    }
    records = [r for r in caplog.records if r.name == "maskrcnn.data.coco"]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "\n" not in msg and "ann.json" in msg
    assert "skipped 4 of 9 annotations" in msg
    assert "1 zero-area box" in msg and "1 polygon with < 3 points" in msg
    assert "2 empty mask or outside the image" in msg
    assert "derived 1 missing boxes from masks" in msg


def test_empty_images_filtered_for_training_kept_otherwise(files):
    assert CocoDataset(*files, filter_empty=True).image_ids == [10, 11]
    ds = CocoDataset(*files, filter_empty=False)
    assert ds.image_ids == [10, 11, 12, 13]
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 8, 8)
    assert empty["labels"].shape == (0,) and empty["iscrowd"].shape == (0,)
    _, crowd_only = ds[3]
    assert crowd_only["iscrowd"].tolist() == [1]
    assert ds.image_sizes == [(16, 20), (24, 12), (8, 8), (8, 8)]


def test_horizontal_flip(files):
    plain = CocoDataset(*files)
    flipped = CocoDataset(*files, train=True, flip_prob=1.0)
    im0, t0 = plain[0]
    im1, t1 = flipped[0]
    assert torch.equal(im1, im0.flip(-1))
    assert torch.equal(t1["masks"].to_dense(), t0["masks"].to_dense().flip(-1))
    assert t1["boxes"].tolist() == [[15, 1, 19, 7], [2, 2, 10, 6], [0, 10, 20, 16]]
    # flip_prob only applies when training
    im2, _ = CocoDataset(*files, train=False, flip_prob=1.0)[0]
    assert torch.equal(im2, im0)


def test_coco_index_available(files):
    ds = CocoDataset(*files)
    assert sorted(ds.coco.getImgIds()) == [10, 11, 12, 13]
    assert len(ds.coco.getAnnIds()) == 9


def test_parse_data_spec():
    assert parse_data_spec("a/train.json:a/images") == (Path("a/train.json"), Path("a/images"))
    assert parse_data_spec("C:/d/x.json:C:/d/img") == (Path("C:/d/x.json"), Path("C:/d/img"))
    for bad in ("train.json", "train.json:", ":images"):
        with pytest.raises(UserError, match="ANN.json:IMAGE_DIR"):
            parse_data_spec(bad)


def test_build_dataset_and_concat(files, tmp_path):
    ds = build_dataset([f"{files[0]}:{files[1]}", f"{files[0]}:{files[1]}"])
    assert len(ds) == 4 and ds.class_names == ["cat", "dog", "zebra"] and ds.category_ids == [3, 7, 90]
    assert ds[3][1]["image_id"] == 11
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = write_coco_dataset(other_root, categories=[{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"},
                                                   {"id": 90, "name": "horse"}])
    with pytest.raises(UserError, match="different categories"):
        concat_datasets([CocoDataset(*files), CocoDataset(*other)])


# ---- bad input: one line naming the file --------------------------------------------------------


def _one_line_error(ann_file: Path, image_dir: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        CocoDataset(ann_file, image_dir)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_annotation_file(tmp_path):
    msg = _one_line_error(tmp_path / "none.json", tmp_path, "does not exist")
    assert "none.json" in msg


def test_missing_image_dir(files, tmp_path):
    _one_line_error(files[0], tmp_path / "nope", "image directory .* does not exist")


def test_malformed_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [}')
    assert "bad.json" in _one_line_error(p, tmp_path, "not valid JSON")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"images": None}, "no 'images' list"),
        ({"categories": [{"id": 1}]}, r"categories\[0\] is missing 'name'"),
        ({"annotations": [{"image_id": 10, "segmentation": []}]}, r"annotations\[0\] is missing 'category_id'"),
        ({"annotations": [{"image_id": 99, "category_id": 3}]}, "image_id 99, which is not in 'images'"),
        ({"annotations": [{"image_id": 10, "category_id": 4}]}, "category_id 4, which is not in 'categories'"),
    ],
)
def test_schema_errors_name_the_file_and_key(tmp_path, overrides, match):
    ann_file, image_dir = write_coco_dataset(tmp_path, **overrides)
    assert "ann.json" in _one_line_error(ann_file, image_dir, match)


def test_everything_filtered_is_an_error(tmp_path):
    ann_file, image_dir = write_coco_dataset(tmp_path, annotations=[])
    _one_line_error(ann_file, image_dir, "no image with a usable")
    assert len(CocoDataset(ann_file, image_dir, filter_empty=False)) == 4


def test_image_size_mismatch(files):
    Image.new("RGB", (30, 16)).save(files[1] / "a.png")
    with pytest.raises(UserError, match="is 30x16 but .* says 20x16"):
        CocoDataset(*files)[0]
