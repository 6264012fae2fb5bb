"""Fine-tuning: a torchvision Mask R-CNN state dict initialises a 3-class model, and its loss falls."""

from __future__ import annotations

import json

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.checkpoint import load_checkpoint
from maskrcnn.cli import main
from maskrcnn.data.shapes import make_shapes


def test_finetune_from_torchvision_state_dict_to_three_classes(tmp_path):
    torch.manual_seed(0)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    weights = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(reference.state_dict(), weights)
    ann, images = make_shapes(tmp_path / "data", num_train=2, num_val=0, seed=1, image_size=96,
                              max_shapes=3, shape_size=(24, 48))["train"]
    out = tmp_path / "run"
    status = main([
        "train", "--config", "torchvision-r50-fpn", "--weights", str(weights), "--out", str(out),
        "model.class_names=[]", f"data.train=['{ann}:{images}']",
        "input.min_size_train=[128]", "input.max_size_train=128", "input.horizontal_flip=0",
        "model.rpn.pre_nms_top_n_train=300", "model.rpn.post_nms_top_n_train=100",
        "model.box_head.batch_size_per_image=64", "solver.ims_per_batch=2", "solver.max_iter=14",
        "solver.base_lr=0.01", "solver.warmup_iters=2", "solver.log_period=1", "solver.checkpoint_period=100",
        "solver.clip_grad_norm=10", "device=cpu",
    ])
    assert status == 0
    final = load_checkpoint(out / "checkpoints" / "model_final.pth")
    assert final["config"]["model"]["num_classes"] == 3
    assert final["config"]["model"]["class_names"] == ["square", "circle", "triangle"]
    assert final["model"]["roi_heads.box_predictor.class_logits.weight"].shape[0] == 4
    # Everything but the class-dependent layers came from the torchvision file (the trunk's stem is frozen).
    assert torch.equal(final["model"]["backbone.trunk.conv1.weight"], reference.state_dict()["backbone.body.conv1.weight"])

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: first {losses[:3]}, last {losses[-3:]}"
