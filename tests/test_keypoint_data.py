"""Keypoint data end to end: stick figures in COCO person-keypoints format, loading, flips, OKS AP, drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskrcnn.cli import main as cli_main
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.figures import KEYPOINT_NAMES, make_figures
from maskrcnn.engine.coco_results import predictions_to_coco
from maskrcnn.engine.evaluator import evaluate_results, format_metrics
from maskrcnn.visualize import draw_instances


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return make_figures(out, num_train=6, num_val=4, seed=3, image_size=(96, 128))


def test_figures_are_coco_person_keypoints(figures):
    ann_file, _ = figures["train"]
    data = json.loads(ann_file.read_text())
    assert data["categories"][0]["keypoints"] == KEYPOINT_NAMES and len(data["categories"][0]["skeleton"]) == 19
    for ann in data["annotations"]:
        assert len(ann["keypoints"]) == 51 and all(isinstance(v, int) for v in ann["keypoints"])
        assert ann["num_keypoints"] == sum(v > 0 for v in ann["keypoints"][2::3])
        assert set(ann["keypoints"][2::3]) <= {0, 1, 2}


def test_dataset_reads_keypoints_at_pixel_centres(figures):
    ann_file, image_dir = figures["train"]
    ds = CocoDataset(ann_file, image_dir)
    assert ds.num_keypoints == 17 and ds.keypoint_names == KEYPOINT_NAMES
    assert ds.keypoint_flip_map[:5] == [0, 2, 1, 4, 3] and ds.skeleton[0] == [16, 14]
    raw = {a["id"]: a for a in json.loads(ann_file.read_text())["annotations"]}
    image, target = ds[0]
    kp = target["keypoints"]
    assert kp.shape == (len(target["boxes"]), 17, 3) and kp.dtype == torch.float32
    first = [a for a in raw.values() if a["image_id"] == ds.image_ids[0]][0]
    expected = torch.tensor(first["keypoints"], dtype=torch.float32).view(17, 3)
    labelled = expected[:, 2] > 0
    assert torch.equal(kp[0, labelled, :2], expected[labelled, :2] + 0.5)  # index i -> centre i + 0.5
    assert torch.equal(kp[0, ~labelled], torch.zeros(int((~labelled).sum()), 3))

    flipped = CocoDataset(ann_file, image_dir, train=True, flip_prob=1.0)
    flipped_image, flipped_target = flipped[0]
    width = image.shape[-1]
    fk = flipped_target["keypoints"]
    assert flipped.image_ids[0] == ds.image_ids[0]
    # Keypoint j of the mirrored picture is keypoint flip_map[j] of the original (the left eye is the
    # right eye), at W - x and the same y.
    source = kp[:, flipped.keypoint_flip_map]
    labelled = source[..., 2] > 0
    assert labelled.sum() >= 2, "the check below would compare (almost) nothing"
    assert torch.allclose(fk[..., 0][labelled], width - source[..., 0][labelled])
    assert torch.equal(fk[..., 1][labelled], source[..., 1][labelled])
    assert torch.equal(fk[..., 2], source[..., 2])
    assert torch.equal(fk[~labelled], torch.zeros(int((~labelled).sum()), 3))


def test_images_without_labelled_keypoints_are_left_out_of_training(tmp_path, figures):
    ann_file, image_dir = figures["train"]
    data = json.loads(ann_file.read_text())
    first_image = data["images"][0]["id"]
    for ann in data["annotations"]:
        if ann["image_id"] == first_image:
            ann["keypoints"], ann["num_keypoints"] = [0] * 51, 0
    edited = tmp_path / "train.json"
    edited.write_text(json.dumps(data))
    assert first_image not in CocoDataset(edited, image_dir, train=True).image_ids  # as Detectron2
    assert first_image in CocoDataset(edited, image_dir, train=False).image_ids  # evaluation keeps it
    assert first_image in CocoDataset(edited, image_dir, train=True, min_keypoints=0).image_ids


def _ground_truth_as_predictions(ds):
    """Return the dataset's own instances as model outputs (in the model's continuous coordinates)."""
    outputs = []
    for i in range(len(ds)):
        _, target = ds[i]
        n = len(target["boxes"])
        outputs.append((target["image_id"], {"boxes": target["boxes"], "labels": target["labels"],
                                             "scores": torch.linspace(0.9, 0.5, n), "keypoints": target["keypoints"]}))
    return outputs


def test_oks_keypoint_ap_of_the_ground_truth_is_100(figures):
    ann_file, image_dir = figures["val"]
    ds = CocoDataset(ann_file, image_dir)
    results = [r for image_id, out in _ground_truth_as_predictions(ds)
               for r in predictions_to_coco(out, image_id, ds.category_ids)]
    assert all(len(r["keypoints"]) == 51 for r in results)
    metrics = evaluate_results(ds.coco, results)
    assert metrics["keypoints"]["AP"] == pytest.approx(100.0)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert "keypoints" in format_metrics(metrics) and "AR50" in format_metrics(metrics)
    # Keypoints moved by a few pixels score lower, not zero.
    for r in results:
        r["keypoints"] = [v + 3.0 if i % 3 != 2 else v for i, v in enumerate(r["keypoints"])]
    shifted = evaluate_results(ds.coco, results, iou_types=("keypoints",))
    assert 0 < shifted["keypoints"]["AP"] < 100


def test_overlay_draws_keypoints_and_skeleton():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    keypoints = torch.zeros(1, 17, 3)
    keypoints[0, :, 0] = torch.linspace(10, 70, 17)
    keypoints[0, :, 1] = 30
    keypoints[0, :, 2] = 1
    output = {"boxes": torch.tensor([[5.0, 5.0, 75.0, 55.0]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1]), "keypoints": keypoints}
    with_kp = np.asarray(draw_instances(image, output, ["person"]))
    without = np.asarray(draw_instances(image, {k: v for k, v in output.items() if k != "keypoints"}, ["person"]))
    assert (with_kp[30] != without[30]).any(axis=1).sum() > 40  # dots and lines along the row y = 30


def test_make_shapes_keypoints_command(tmp_path, capsys):
    assert cli_main(["make-shapes", "--keypoints", "--out", str(tmp_path), "--train", "2", "--val", "1",
                     "--size", "96"]) == 0
    assert "--config figures" in capsys.readouterr().out
    data = json.loads((tmp_path / "train.json").read_text())
    assert data["categories"][0]["name"] == "person" and data["annotations"][0]["keypoints"]


def test_evaluate_runs_a_keypoint_model_and_scores_oks(figures, tmp_path):
    from maskrcnn.config import load_config
    from maskrcnn.engine.evaluator import evaluate
    from maskrcnn.modeling import build_model
    tiny = ["model.num_classes=1", "model.backbone.depth=18", "model.backbone.fpn_channels=32",
            "model.box_head.fc_dim=64", "model.mask_head.enabled=false", "model.keypoint_head.enabled=true",
            "model.keypoint_head.num_convs=1", "model.keypoint_head.conv_dim=16",
            "model.rpn.post_nms_top_n_test=50", "model.box_head.detections_per_image=5",
            "model.box_head.score_thresh=0.0", "input.min_size_test=96", "input.max_size_test=128"]
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny))
    ann_file, image_dir = figures["val"]
    metrics = evaluate(model, CocoDataset(ann_file, image_dir), tmp_path, progress=False)
    assert "keypoints" in metrics and "segm" not in metrics  # an untrained model scores ~0, but is scored
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert predictions and all(len(p["keypoints"]) == 51 for p in predictions)
    assert json.loads((tmp_path / "metrics.json").read_text())["keypoints"]["AP"] is not None
