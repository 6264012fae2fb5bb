"""Cascade R-CNN: per-stage matching, score averaging, detached refinement, class-agnostic boxes, training."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from support import TINY, Running, png_bytes, saved_checkpoint
from PIL import Image

from maskrcnn.api import load_model
from maskrcnn.cli import main
from maskrcnn.config import ConfigError, load_config
from maskrcnn.modeling import build_model
from maskrcnn.modeling.cascade import CascadeRoIHeads, scale_gradient
from maskrcnn.modeling.roi_heads import RoIHeads
from maskrcnn.serve import create_app

CASCADE = TINY + ["model.box_head.batch_size_per_image=64"]


def cascade_model(extra: list[str] = ()):
    torch.manual_seed(0)
    return build_model(load_config("shapes-cascade", CASCADE + list(extra)))


def square_target(box=(10.0, 10.0, 50.0, 50.0), label=2, size=64):
    x0, y0, x1, y1 = (int(v) for v in box)
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, y0:y1, x0:x1] = 1
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([label]), "masks": masks}


def test_the_switch_builds_one_head_and_class_agnostic_predictor_per_stage():
    heads = cascade_model().roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert len(heads.box_head) == len(heads.box_predictor) == 3
    assert [m.high for m in heads.matchers] == [0.5, 0.6, 0.7]
    assert [c.weights for c in heads.coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert heads.box_head[0].fcs[0].weight.data_ptr() != heads.box_head[1].fcs[0].weight.data_ptr()
    plain = build_model(load_config("shapes", TINY)).roi_heads
    assert type(plain) is RoIHeads and plain.box_predictor.box_deltas.out_features == 4 * 4


def test_each_stage_matches_at_its_own_threshold():
    heads = cascade_model().roi_heads
    target = square_target()  # GT 40x40 at (10, 10)
    boxes = torch.tensor([
        [10.0, 10.0, 32.0, 50.0],  # IoU 0.55: positive at 0.5 only
        [10.0, 10.0, 36.0, 50.0],  # IoU 0.65: positive at 0.5 and 0.6
        [10.0, 10.0, 50.0, 49.0],  # IoU 0.975: positive everywhere
        [10.0, 10.0, 28.0, 50.0],  # IoU 0.45: negative everywhere (no ignored band between thresholds)
    ])
    labels = [heads.label_stage(stage, [boxes], [target])[0].labels.tolist() for stage in range(3)]
    assert labels == [[2, 2, 2, 0], [0, 2, 2, 0], [0, 0, 2, 0]]
    # The first stage samples the RPN's proposals (with the GT added) at the first threshold.
    torch.manual_seed(0)
    sampled = heads.sample_proposals([boxes], [target])[0]
    by_box = {tuple(b.tolist()): int(label) for b, label in zip(sampled.boxes, sampled.labels)}
    assert by_box[(10.0, 10.0, 32.0, 50.0)] == 2 and by_box[(10.0, 10.0, 50.0, 50.0)] == 2


def test_training_labels_each_stage_at_its_own_threshold():
    """Boxes that stages do not move (zero deltas): 3, 2 and 1 of them are positives at IoU 0.5, 0.6, 0.7.

    The stages' losses are weighted by `cascade.loss_weights` (here the paper's 1, 0.5, 0.25).
    """
    heads = cascade_model(["model.box_head.cascade.loss_weights=[1,0.5,0.25]"]).roi_heads.train()
    with torch.no_grad():  # no box moves; every RoI is called background with confidence, so each
        for predictor in heads.box_predictor:  # positive costs ~10 in the classification loss
            predictor.box_deltas.weight.zero_()
            predictor.box_deltas.bias.zero_()
            predictor.class_logits.weight.zero_()
            predictor.class_logits.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    target = square_target()
    boxes = torch.tensor([[10.0, 10.0, 32.0, 50.0], [10.0, 10.0, 36.0, 50.0], [10.0, 10.0, 50.0, 50.0]])  # IoU .55 .65 1
    sampled = [heads.label_rois(heads.matcher, boxes, target)]
    features = [torch.rand(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    losses, _ = heads.box_branch_losses(features, sampled, [target], [(64, 64)])
    classifier = [losses[f"loss_classifier_stage{k}"].item() for k in range(3)]
    assert classifier == pytest.approx([10 * 3 / 3, 10 * 2 / 3 * 0.5, 10 * 1 / 3 * 0.25], rel=1e-3)


def test_config_mistakes_name_the_key():
    with pytest.raises(ConfigError, match="class_agnostic=true"):
        load_config("shapes", ["model.box_head.cascade.enabled=true"])
    with pytest.raises(ConfigError, match="cascade.loss_weights' has 2 entries"):
        load_config("shapes-cascade", ["model.box_head.cascade.loss_weights=[1,1]"])
    with pytest.raises(ConfigError, match="4 weights"):
        load_config("shapes-cascade", ["model.box_head.cascade.bbox_reg_weights=[[1,1],[1,1],[1,1]]"])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        load_config("shapes-cascade", ["model.box_head.cascade.ious=[0.5,0.6,1.5]"])
    with pytest.raises(ConfigError, match="FPN-style box head"):
        load_config("R50-C4-1x", ["model.box_head.class_agnostic=true", "model.box_head.cascade.enabled=true"])
    two = load_config("shapes-cascade", ["model.box_head.cascade.ious=[0.5,0.7]",
                                         "model.box_head.cascade.bbox_reg_weights=[[10,10,5,5],[30,30,15,15]]",
                                         "model.box_head.cascade.loss_weights=[1,0.5]"])
    assert build_model(two).roi_heads.num_stages == 2


def test_scores_are_the_mean_of_the_stages_probabilities():
    model = cascade_model()
    heads = model.roi_heads
    biases = [torch.tensor([0.0, 2.0, 0.0, -1.0]), torch.tensor([1.0, -1.0, 3.0, 0.0]),
              torch.tensor([0.0, 0.5, 0.5, 2.5])]
    with torch.no_grad():  # every RoI gets each stage's fixed class distribution; boxes are not moved
        for predictor, bias in zip(heads.box_predictor, biases):
            predictor.class_logits.weight.zero_()
            predictor.class_logits.bias.copy_(bias)
            predictor.box_deltas.weight.zero_()
    expected = torch.stack([b.softmax(0) for b in biases]).mean(0)
    assert not torch.allclose(expected, biases[-1].softmax(0), atol=0.05)  # the mean, not the last stage
    out = model([torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))])[0]
    assert len(out["scores"]) > 0
    assert torch.allclose(out["scores"], expected[out["labels"]], atol=1e-6)


def _train_batch(model):
    model.train()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [square_target(), square_target((5.0, 20.0, 40.0, 60.0), label=1)]
    return model(images, targets)


def test_later_stages_send_no_gradient_into_earlier_stages_boxes():
    model = cascade_model()
    losses = _train_batch(model)
    assert {f"loss_box_reg_stage{k}" for k in range(3)} <= set(losses)
    predictors = model.roi_heads.box_predictor
    for stage in (1, 2):
        model.zero_grad(set_to_none=True)
        assert losses[f"loss_box_reg_stage{stage}"] > 0  # positives in this stage: the test can fail
        losses[f"loss_box_reg_stage{stage}"].backward(retain_graph=True)
        assert predictors[stage].box_deltas.weight.grad.abs().sum() > 0
        for earlier in range(stage):
            grad = predictors[earlier].box_deltas.weight.grad
            assert grad is None or not grad.any(), (stage, earlier)


def test_shared_features_get_one_stages_worth_of_gradient():
    x = torch.ones(3, requires_grad=True)
    scale_gradient(x, 1.0 / 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 1.0 / 3))


def test_class_agnostic_regression_has_four_outputs_and_trains():
    torch.manual_seed(0)
    model = build_model(load_config("shapes", TINY + ["model.box_head.class_agnostic=true"]))
    assert type(model.roi_heads) is RoIHeads and model.roi_heads.box_predictor.box_deltas.out_features == 4
    assert all(p.box_deltas.out_features == 4 for p in cascade_model().roi_heads.box_predictor)
    losses = _train_batch(model)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.box_deltas.weight.grad.abs().sum() > 0
    model.eval()
    out = model([torch.rand(3, 64, 64)])[0]
    assert len(out["boxes"]) > 0 and out["masks"].shape[1:] == (64, 64)


def test_cascade_shapes_model_trains_evaluates_and_predicts(shapes, tmp_path):
    ann, images = shapes["train"]
    val_ann, val_images = shapes["val"]
    out = tmp_path / "run"
    code = main(["train", "--config", "shapes-cascade", "--out", str(out), *CASCADE,
                 f"data.train=['{ann}:{images}']", "input.min_size_train=[64]", "input.max_size_train=96",
                 "input.min_size_test=64", "input.max_size_test=96", "solver.ims_per_batch=2", "solver.max_iter=3",
                 "solver.warmup_iters=1", "solver.log_period=1", "solver.checkpoint_period=100", "solver.amp=",
                 "device=cpu"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss_classifier_stage2" in r]
    assert len(logged) == 3
    assert all(torch.isfinite(torch.tensor(r[k])) for r in logged for k in r if k.startswith("loss"))
    weights = out / "checkpoints" / "model_final.pth"
    assert main(["eval", "--weights", str(weights), "--data", f"{val_ann}:{val_images}", "--out",
                 str(tmp_path / "eval")]) == 0
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())) >= {"bbox", "segm"}
    assert main(["predict", str(val_images), "--weights", str(weights), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "predictions.json").exists()


def test_serve_answers_with_the_cascade_models_detections(tmp_path):

    model = cascade_model()
    weights = tmp_path / "cascade.pth"
    saved_checkpoint(model, weights)
    loaded = load_model(None, weights=weights)
    assert isinstance(loaded.roi_heads, CascadeRoIHeads)
    running = Running(create_app(loaded, score_threshold=0.0))
    data = png_bytes()
    try:
        response = httpx.post(f"{running.url}/predict", files={"file": ("a.png", data, "image/png")})
    finally:
        running.stop()
    assert response.status_code == 200, response.text
    scores = [d["score"] for d in response.json()["detections"]]
    expected = model.predict(np.asarray(Image.open(io.BytesIO(data))), score_threshold=0.0)[0]["scores"]
    assert len(scores) == len(expected) > 0 and scores == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_cascade_checkpoint_in_a_plain_model_is_one_line_naming_the_stages(tmp_path):
    from maskrcnn.checkpoint import CheckpointError, load_weights

    model = cascade_model()
    weights = tmp_path / "cascade.pth"
    saved_checkpoint(model, weights)
    with pytest.raises(CheckpointError, match="3 classes, 3 cascade stages") as error:
        load_weights(build_model(load_config("shapes", TINY)), weights)
    assert "\n" not in str(error.value)
