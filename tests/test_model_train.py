"""Tiny FPN and C4 Mask R-CNNs on CPU: training losses and gradients, edge-case targets, inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import load_config
from maskrcnn.modeling import build_model

LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}

# A small ResNet-18 model on ~128 px images, with thin heads and few proposals to stay fast on CPU.
TINY = [
    "model.num_classes=3",
    "model.class_names=[cat,dog,bird]",
    "model.backbone.depth=18",
    "input.min_size_train=[128]",
    "input.max_size_train=200",
    "input.min_size_test=128",
    "input.max_size_test=200",
    "model.backbone.fpn_channels=32",
    "model.box_head.fc_dim=64",
    "model.mask_head.conv_dim=16",
    "model.box_head.batch_size_per_image=64",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=100",
    "model.rpn.pre_nms_top_n_test=300",
    "model.rpn.post_nms_top_n_test=50",
    "model.box_head.detections_per_image=20",
]
C4 = [
    "model.backbone.kind=c4",
    "model.box_head.type=res5",
    "model.box_head.pooler.output_size=14",
    "model.box_head.pooler.sampling_ratio=0",
    "model.anchors.sizes=[[32,64,128,256,512]]",
]
KINDS = {"fpn": TINY, "c4": TINY + C4}


def _model(kind: str, extra: list[str] = ()):
    torch.manual_seed(0)
    return build_model(load_config(None, KINDS[kind] + list(extra)))


def _target(boxes, labels, crowd, h=120, w=160):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.round().long().tolist()):
        m[y1:y2, x1:x2] = 1
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1),
            "masks": masks, "iscrowd": torch.tensor(crowd, dtype=torch.int64).reshape(-1)}


def _check_losses(losses):
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() >= 0, name


@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_train_step_losses_and_gradients(kind):
    model = _model(kind).train()
    images = [torch.rand(3, 120, 160), torch.rand(3, 100, 140)]
    targets = [_target([[20, 10, 80, 50], [90, 60, 150, 110]], [1, 3], [0, 0]),
               _target([[10, 10, 60, 90]], [2], [0], 100, 140)]
    losses = model(images, targets)
    _check_losses(losses)
    sum(losses.values()).backward()
    trunk = model.backbone.trunk
    # trainable_stages = 3 (default): res5, res4, res3 train; res2 and the stem are frozen
    for stage in ("layer4", "layer3", "layer2"):
        grads = [p.grad for p in getattr(trunk, stage).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), stage
        assert any(g.abs().sum() > 0 for g in grads), stage
    assert trunk.conv1.weight.grad is None
    assert all(p.grad is None and not p.requires_grad for p in trunk.layer1.parameters())
    # the heads learn too
    assert model.rpn.head.objectness.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.class_logits.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0


def test_trainable_stages_zero_freezes_trunk():
    model = _model("fpn", ["model.backbone.trainable_stages=0"]).train()
    losses = model([torch.rand(3, 120, 160)], [_target([[20, 10, 80, 50]], [1], [0])])
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.trunk.parameters())
    assert model.backbone.fpn.output[0][0].weight.grad is not None


@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_image_without_boxes(kind):
    model = _model(kind).train()
    empty = _target(torch.zeros(0, 4).tolist(), [], [])
    assert empty["masks"].shape == (0, 120, 160)
    losses = model([torch.rand(3, 120, 160)], [empty])
    _check_losses(losses)
    # no object: no positive anchor or RoI, so nothing to regress and no mask target
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()  # still differentiable
    # an empty image next to a normal one
    losses = model([torch.rand(3, 120, 160)] * 2, [empty, _target([[20, 10, 80, 50]], [1], [0])])
    _check_losses(losses)
    assert losses["loss_mask"].item() > 0


@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_crowd_only_image(kind):
    model = _model(kind).train()
    losses = model([torch.rand(3, 120, 160)], [_target([[20, 10, 80, 50]], [1], [1])])
    _check_losses(losses)
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()


def test_training_without_targets_is_an_error():
    model = _model("fpn").train()
    with pytest.raises(ValueError, match="targets"):
        model([torch.rand(3, 64, 64)])


@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_eval_outputs_at_input_size(kind):
    model = _model(kind).eval()
    sizes = [(120, 160), (90, 70)]
    with torch.no_grad():
        outs = model([torch.rand(3, h, w) for h, w in sizes])
    assert len(outs) == 2
    for out, (h, w) in zip(outs, sizes):
        assert set(out) == {"boxes", "scores", "labels", "masks"}
        d = len(out["boxes"])
        assert d > 0  # random heads score every class ~1/4 > score_thresh 0.05
        assert d <= 20
        assert out["boxes"].shape == (d, 4) and out["scores"].shape == (d,) and out["labels"].shape == (d,)
        assert out["masks"].dtype == torch.bool and out["masks"].shape == (d, h, w)
        assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
        assert (out["boxes"][:, 0::2] >= 0).all() and (out["boxes"][:, 0::2] <= w + 1e-3).all()
        assert (out["boxes"][:, 1::2] >= 0).all() and (out["boxes"][:, 1::2] <= h + 1e-3).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()  # sorted best first


def test_predict_numpy_pil_and_path(tmp_path):
    model = _model("fpn").train()
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    results = model.predict([array, Image.fromarray(array), str(path), path])
    assert model.training  # predict restores the mode it found
    assert len(results) == 4
    for r in results:
        assert set(r) == {"boxes", "scores", "labels", "masks", "names"}
        assert r["masks"].shape[1:] == (60, 80) and r["masks"].dtype == torch.bool
        assert len(r["names"]) == len(r["labels"])
        assert all(n == ["cat", "dog", "bird"][int(l) - 1] for n, l in zip(r["names"], r["labels"]))
    # the same pixels give the same detections whichever way they were passed in
    for r in results[1:]:
        torch.testing.assert_close(r["boxes"], results[0]["boxes"])
    single = model.predict(array, score_threshold=0.3)
    assert len(single) == 1 and (single[0]["scores"] >= 0.3).all()
    assert len(single[0]["names"]) == len(single[0]["scores"])


def test_resized_shape():
    from maskrcnn.modeling.mask_rcnn import resized_shape

    # shorter side 120 -> 128: scale 16/15, width 160 * 16/15 = 170.67 -> 170
    assert resized_shape(120, 160, 128, 200)[:2] == (128, 170)
    assert resized_shape(64, 96, 128, 1000) == (128, 192, 2.0)
    # 100x400 -> 128 would make the long side 512 > 200: the long side decides, scale 0.5
    assert resized_shape(100, 400, 128, 200) == (50, 200, 0.5)
    # portrait: 70 -> 128 (scale 1.829), 90 * 1.829 = 164.6 -> 164
    assert resized_shape(90, 70, 128, 200)[:2] == (164, 128)


def test_multi_scale_training_draws_a_size_per_image_and_eval_uses_the_test_size():
    cfg = load_config(None, ["model.num_classes=3", "model.backbone.depth=18", "input.min_size_train=[64,96]",
                             "input.max_size_train=500", "input.min_size_test=80", "input.max_size_test=500"])
    model = build_model(cfg).train()
    torch.manual_seed(0)
    drawn = {model._target_size(100, 100) for _ in range(50)}
    assert drawn == {(64, 500), (96, 500)}
    model.eval()
    assert model._target_size(100, 100) == (80, 500)


@pytest.mark.parametrize("cap", [0, 3])
def test_mask_head_rois_per_image_cap(cap):
    """`max_rois_per_image` runs the mask head on at most that many positives per image (0: all)."""
    model = _model("fpn", [f"model.mask_head.max_rois_per_image={cap}"]).train()
    seen = []
    model.roi_heads.mask_head.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    images = [torch.rand(3, 120, 160), torch.rand(3, 120, 160)]
    boxes = [[20, 10, 80, 50], [90, 60, 150, 110]]
    targets = [_target(boxes, [1, 3], [0, 0]), _target(boxes, [2, 2], [0, 0])]
    losses = model(images, targets)
    sum(losses.values()).backward()
    # the GT boxes join the proposals, so each image has at least 2 positives; random RPN weights give more
    if cap:
        assert seen == [2 * cap]
    else:
        assert seen[0] > 2 * 3
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0


def test_mask_loss_weight_scales_the_mask_loss_only():
    images = [torch.rand(3, 120, 160)]
    targets = [_target([[20, 10, 80, 50], [90, 60, 150, 110]], [1, 3], [0, 0])]
    losses = {}
    for weight in (1.0, 2.5):
        model = _model("fpn", [f"model.mask_head.loss_weight={weight}"]).train()
        torch.manual_seed(1)  # the same RoI samples for both
        losses[weight] = model(images, targets)
    assert losses[2.5]["loss_mask"].item() == pytest.approx(2.5 * losses[1.0]["loss_mask"].item(), rel=1e-5)
    assert losses[2.5]["loss_classifier"].item() == pytest.approx(losses[1.0]["loss_classifier"].item(), rel=1e-6)
