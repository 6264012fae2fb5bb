"""Shared fixtures: a tiny saved model for the command-line tests."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.checkpoint import save_checkpoint
from maskrcnn.config import load_config
from maskrcnn.modeling import build_model

TINY = [
    "model.backbone.fpn_channels=32", "model.box_head.fc_dim=64", "model.mask_head.conv_dim=16",
    "model.rpn.post_nms_top_n_test=50", "model.box_head.detections_per_image=10",
    "model.box_head.score_thresh=0.0",
]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny shapes model saved as one of our checkpoints (its config inside)."""
    torch.manual_seed(0)
    cfg = load_config("shapes", TINY)
    model = build_model(cfg)
    with torch.no_grad():  # confident enough that a few boxes pass the score threshold
        model.roi_heads.box_predictor.class_logits.bias.copy_(torch.tensor([-3.0, 3.0, 0.0, 0.0]))
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "iteration": 0})
    return path
