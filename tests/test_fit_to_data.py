"""data.fit_to_data: the recipe's scale, training windows, anchors and counts chosen from the training set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from maskrcnn.config import load_config
from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine.fit_to_data import DataStatistics, choose, fit_to_data, nice_scale
from maskrcnn.modeling import build_model


def _square_dataset(root: Path, image_side: int, object_sides: list[list[int]]) -> CocoDataset:
    """A COCO file of square objects (no image files: statistics read annotations only), one list per image."""
    images, annotations = [], []
    for i, sides in enumerate(object_sides, start=1):
        images.append({"id": i, "file_name": f"{i}.png", "height": image_side, "width": image_side})
        for k, s in enumerate(sides):
            x = y = 1 + 2 * k % max(1, image_side - s - 1)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                                "bbox": [x, y, s, s], "area": s * s,
                                "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]]})
    ann = root / "train.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "cell"}]}))
    (root / "images").mkdir(exist_ok=True)
    return CocoDataset(ann, root / "images", train=True)


def test_small_objects_in_large_images_are_scaled_up_and_cropped(tmp_path):
    # 10-px objects in 1000-px images: x4 brings the median to 40 px, training windows of 512 px are 128
    # px of the image, the smallest anchor sits at the 5th-percentile object (8 px -> 32 after scaling).
    dataset = _square_dataset(tmp_path, 1000, [[8] * 5 + [10] * 90 + [12] * 5, [10] * 60])
    stats = DataStatistics.of(dataset)
    assert stats.objects_per_image.tolist() == [100, 60]
    chosen = {k: v for k, (v, _) in choose(stats).items()}
    assert chosen["input.scale"] == 4.0
    assert chosen["input.crop.enabled"] is True and chosen["input.crop.size"] == [128.0, 128.0]
    assert chosen["model.anchors.sizes"] == [[32], [64], [128], [256], [512]]
    assert chosen["input.max_size_test"] == 4000
    # 100 objects an image: 1.2 x 100 rounded up to 50 -> 150 detections, 300 proposals kept at least 1000
    assert chosen["model.box_head.detections_per_image"] == 150
    assert chosen["model.rpn.post_nms_top_n_test"] == 1000
    assert chosen["input.vertical_flip"] == chosen["input.rotate90"] == 0.5  # two images: few
    assert chosen["input.color_jitter.contrast"] == 0.3


def test_large_objects_are_scaled_down_and_small_images_not_cropped(tmp_path):
    dataset = _square_dataset(tmp_path, 400, [[160, 200, 240]] * 3)
    chosen = {k: v for k, (v, _) in choose(DataStatistics.of(dataset)).items()}
    assert chosen["input.scale"] == 0.25  # 40 / 200 = 0.2, clamped to the smallest factor allowed
    assert "input.crop.enabled" not in chosen  # 400 px x 0.25 = 100 px: whole images fit a training window
    assert chosen["model.anchors.sizes"][0] == [32]  # 40 px objects: the largest smallest anchor allowed
    assert chosen["model.box_head.detections_per_image"] == 100


def test_nice_scale_rounds_and_clamps():
    assert [nice_scale(x) for x in (2.05, 1.13, 0.333, 9.0, 0.01)] == [2.0, 1.25, 0.33, 4.0, 0.25]


def test_fit_sets_the_config_logs_why_and_keeps_overrides(tmp_path, caplog):
    dataset = _square_dataset(tmp_path, 1000, [[10] * 20])
    cfg = load_config("own-data", ["model.anchors.sizes=[[64],[128],[256],[512],[1024]]"])
    with caplog.at_level(logging.INFO):
        lines = fit_to_data(cfg, dataset, keep=["model.anchors.sizes"])
    assert cfg.input.scale == 4.0 and cfg.input.crop.enabled
    assert cfg.model.anchors.sizes == [[64], [128], [256], [512], [1024]]  # the user's value stays
    assert any("model.anchors.sizes kept at" in line for line in lines)
    assert any(line.startswith("fitted to the data: input.scale=4.0  (median object 10.0 px") for line in lines)
    assert lines[0].startswith("fitted to the data: 1 images, 20 objects")
    assert caplog.messages[: len(lines)] == lines


def test_input_scale_resizes_every_image_by_one_factor():
    cfg = load_config("shapes", ["input.scale=2.0", "input.max_size_test=1000", "input.max_size_train=120"])
    model = build_model(cfg)
    images = [torch.rand(3, 50, 70), torch.rand(3, 30, 40)]
    model.eval()
    _, sizes, _ = model.preprocess(images, None)
    assert sizes == [(100, 140), (60, 80)]  # not both to one shorter side, as min_size_test would
    model.train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    _, sizes, resized = model.preprocess(images, targets)
    assert sizes == [(85, 120), (60, 80)]  # the first capped by max_size_train=120
    assert resized[1]["boxes"].tolist() == [[20.0, 20.0, 40.0, 60.0]]


def test_train_without_config_fits_the_recipe_to_the_data(shapes, tmp_path, capsys):
    from maskrcnn.cli import main

    ann, images = shapes["train"]
    out = tmp_path / "run"
    code = main(["train", f"data.train=[{ann}:{images}]", "--out", str(out), "solver.max_iter=1",
                 "model.box_head.detections_per_image=77", "solver.amp="])
    assert code == 0
    saved = load_config(str(out / "config.yaml"), [])
    assert saved.data.fit_to_data and saved.input.scale > 0
    assert saved.model.box_head.detections_per_image == 77  # an override wins over the fit
    assert saved.model.class_names == ["square", "circle", "triangle"]  # classes from the data
