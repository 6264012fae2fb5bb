"""Keypoint R-CNN pieces: heat-map targets and arg-max decoding, flips, resizing, a tiny model end to end."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.config import ConfigError, load_config
from maskrcnn.data.transforms import hflip, keypoint_flip_map
from maskrcnn.modeling import build_model
from maskrcnn.modeling.keypoint_head import heatmaps_to_keypoints, keypoint_loss, keypoint_targets

SIZE = 56


def peaked_logits(index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Return [P, K, m, m] logits peaked at each target cell: a blob (σ = 1.5 cells), as trained maps are.

    (A lone one-hot cell would alias away when a map is resized below 56 pixels: bicubic sampling has
    no low-pass filter.)
    """
    grid = torch.arange(SIZE, dtype=torch.float32)
    row, col = (index // SIZE).float(), (index % SIZE).float()
    d2 = (grid[:, None] - row[..., None, None]) ** 2 + (grid[None, :] - col[..., None, None]) ** 2
    return 10.0 * torch.exp(-d2 / (2 * 1.5**2)) * valid[..., None, None]


@pytest.mark.parametrize("box", [(10.0, 20.0, 50.0, 75.0), (3.5, 7.25, 20.0, 60.0), (100.0, 0.0, 156.0, 56.0)])
def test_keypoint_round_trips_through_heatmap_within_one_pixel(box):
    torch.manual_seed(0)
    boxes = torch.tensor([box])
    x1, y1, x2, y2 = box
    k = 30
    xs = x1 + torch.rand(k) * (x2 - x1)
    ys = y1 + torch.rand(k) * (y2 - y1)
    keypoints = torch.stack([xs, ys, torch.full((k,), 2.0)], dim=1)[None]
    keypoints[0, 0, :2] = torch.tensor([x2, y2])  # on the far edges: the last cell
    index, valid = keypoint_targets(keypoints, boxes, SIZE)
    assert valid.all()
    decoded, scores = heatmaps_to_keypoints(peaked_logits(index, valid), boxes)
    error = (decoded[0, :, :2] - keypoints[0, :, :2]).abs()
    assert float(error.max()) <= 1.0, error.max()
    assert torch.equal(decoded[0, :, 2], torch.ones(k)) and bool((scores > 0).all())  # the peak, resampled


def test_large_box_round_trip_within_half_a_cell_plus_half_a_pixel():
    boxes = torch.tensor([[0.0, 0.0, 300.0, 200.0]])
    keypoints = torch.tensor([[[123.4, 56.7, 1.0], [299.0, 1.0, 2.0]]])
    index, valid = keypoint_targets(keypoints, boxes, SIZE)
    decoded, _ = heatmaps_to_keypoints(peaked_logits(index, valid), boxes)
    error = (decoded[0, :, :2] - keypoints[0, :, :2]).abs()
    assert float(error[:, 0].max()) <= 300 / SIZE / 2 + 0.5 and float(error[:, 1].max()) <= 200 / SIZE / 2 + 0.5


def test_targets_skip_unlabelled_and_outside_keypoints():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    keypoints = torch.tensor([[[15.0, 15.0, 2.0], [15.0, 15.0, 0.0], [5.0, 15.0, 1.0], [15.0, 31.0, 2.0],
                               [10.0, 10.0, 1.0]]])
    index, valid = keypoint_targets(keypoints, boxes, SIZE)
    assert valid.tolist() == [[True, False, False, False, True]]
    assert int(index[0, 0]) == 14 * SIZE + 14 and int(index[0, 4]) == 0
    logits = torch.randn(1, 5, SIZE, SIZE, requires_grad=True)
    loss = keypoint_loss(logits, index, valid)
    expected = torch.nn.functional.cross_entropy(logits.flatten(2)[0, [0, 4]], index[0, [0, 4]])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0  # unlabelled keypoints give no gradient
    empty = keypoint_loss(logits, index, torch.zeros_like(valid))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_flip_map_pairs_left_and_right_names():
    names = ["nose", "left_eye", "right_eye", "left_shoulder", "right_shoulder", "Knee Left", "knee right", "tail"]
    assert keypoint_flip_map(names) == [0, 2, 1, 4, 3, 6, 5, 7]


def test_hflip_mirrors_and_swaps_left_and_right_keypoints():
    names = ["nose", "left_eye", "right_eye"]
    image = torch.rand(3, 20, 100)
    target = {"boxes": torch.tensor([[10.0, 2.0, 40.0, 18.0]]),
              "keypoints": torch.tensor([[[25.0, 5.0, 2.0], [20.0, 4.0, 2.0], [30.0, 4.0, 1.0]]])}
    flipped_image, flipped = hflip(image, target, keypoint_flip_map(names))
    assert torch.equal(flipped_image, image.flip(-1))
    # The nose mirrors in place; the left eye (was at x=20) is now the right eye at 100 - 20 = 80.
    assert flipped["keypoints"].tolist() == [[[75.0, 5.0, 2.0], [70.0, 4.0, 1.0], [80.0, 4.0, 2.0]]]
    assert flipped["boxes"].tolist() == [[60.0, 2.0, 90.0, 18.0]]
    # Flipping twice gives the original back.
    _, twice = hflip(flipped_image, flipped, keypoint_flip_map(names))
    assert torch.equal(twice["keypoints"], target["keypoints"])


# A tiny R18-FPN Keypoint R-CNN (5 keypoints, thin heads) on ~128 px images.
TINY = [
    "model.num_classes=1", "model.class_names=[figure]", "model.backbone.depth=18",
    "model.backbone.fpn_channels=32", "model.box_head.fc_dim=64", "model.mask_head.enabled=false",
    "model.keypoint_head.enabled=true", "model.keypoint_head.num_keypoints=5",
    "model.keypoint_head.num_convs=2", "model.keypoint_head.conv_dim=16",
    "model.box_head.batch_size_per_image=64", "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=100", "model.rpn.pre_nms_top_n_test=300", "model.rpn.post_nms_top_n_test=50",
    "model.box_head.detections_per_image=10", "model.box_head.score_thresh=0.0",
    "input.min_size_train=[128]", "input.max_size_train=200", "input.min_size_test=128", "input.max_size_test=200",
]


def _target(h=120, w=160, visibility=2.0):
    boxes = torch.tensor([[20.0, 10.0, 80.0, 100.0], [90.0, 30.0, 150.0, 110.0]])
    keypoints = torch.zeros(2, 5, 3)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        keypoints[i, :, 0] = torch.linspace(x1 + 5, x2 - 5, 5)
        keypoints[i, :, 1] = torch.linspace(y1 + 5, y2 - 5, 5)
    keypoints[..., 2] = visibility
    return {"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "keypoints": keypoints,
            "iscrowd": torch.tensor([0, 0])}


def test_tiny_keypoint_model_trains_and_predicts_in_image_pixels():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY)).train()
    losses = model([torch.rand(3, 120, 160)], [_target()])
    assert "loss_keypoint" in losses and "loss_mask" not in losses
    assert 0 < float(losses["loss_keypoint"].detach()) < 20
    sum(losses.values()).backward()
    assert model.roi_heads.keypoint_head.deconv.weight.grad.abs().sum() > 0
    # No labelled keypoint at all: the loss is a zero that still reaches the head.
    losses = model([torch.rand(3, 120, 160)], [_target(visibility=0.0)])
    assert float(losses["loss_keypoint"].detach()) == 0.0 and losses["loss_keypoint"].requires_grad

    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 240, 320)])[0]
    d = len(out["boxes"])
    assert d > 0 and out["keypoints"].shape == (d, 5, 3) and out["keypoint_scores"].shape == (d, 5)
    # Keypoints lie in their box, in the input image's pixels (the model ran at 128 px).
    boxes = out["boxes"]
    assert bool(((out["keypoints"][..., 0] >= boxes[:, None, 0] - 1) & (out["keypoints"][..., 0] <= boxes[:, None, 2] + 1)).all())
    assert float(boxes[:, 2].max()) > 200  # boxes were scaled back too


def test_resized_targets_scale_keypoints_with_the_image():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY)).train()
    target = _target()
    _, _, resized = model.preprocess([torch.rand(3, 120, 160)], [target])
    scale = torch.tensor([170 / 160, 128 / 120])  # 120x160 resized to 128x170 (sizes floored)
    assert torch.allclose(resized[0]["keypoints"][..., :2], target["keypoints"][..., :2] * scale, atol=1e-4)
    assert torch.equal(resized[0]["keypoints"][..., 2], target["keypoints"][..., 2])


def test_keypoint_config_is_checked():
    with pytest.raises(ConfigError, match="keypoint_names"):
        load_config(None, TINY + ["model.keypoint_head.keypoint_names=[a,b]"])
    with pytest.raises(ConfigError, match="skeleton"):
        load_config(None, TINY + ["model.keypoint_head.skeleton=[[1,6]]"])
    cfg = load_config("torchvision-keypoint-r50-fpn")
    assert cfg.model.keypoint_head.enabled and not cfg.model.mask_head.enabled and cfg.model.num_classes == 1
