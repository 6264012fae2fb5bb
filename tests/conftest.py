"""Shared fixtures: a tiny saved model for the command-line tests, a tiny shapes dataset, run configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.checkpoint import save_checkpoint
from maskrcnn.data.shapes import make_shapes
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


@pytest.fixture
def artifacts(request) -> Path:
    """A folder for files a person may want to see after the run (screenshots), one per test: under
    $MASKRCNN_TEST_ARTIFACTS, else runs/test-artifacts/ in the repository (git ignores runs/)."""
    root = os.environ.get("MASKRCNN_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"
    folder = Path(root) / request.node.name
    shutil.rmtree(folder, ignore_errors=True)  # only this run's files
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Six 48-px training images and two validation images, written once per test module."""
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes(root, num_train=6, num_val=2, seed=0, image_size=48, max_shapes=2, shape_size=(12, 24))


def quick_run_config(shapes, output_dir, extra: list[str] = ()):
    """A 6-iteration CPU run on `shapes` that checkpoints and logs every 2 iterations."""
    ann, images = shapes["train"]
    return load_config(None, [
        f"data.train=['{ann}:{images}']", f"output_dir={output_dir}", "device=cpu",
        "solver.ims_per_batch=2", "solver.max_iter=6", "solver.checkpoint_period=2",
        "solver.warmup_iters=2", "solver.base_lr=0.01", "solver.log_period=2", *extra,
    ])


def plain_layout_copy(model):
    """The same model and weights without the CPU fast path (NCHW, BN after conv): torchvision's sums."""
    cfg = model.cfg.clone()
    cfg.model.channels_last = False
    cfg.model.backbone.fold_frozen_bn = False
    plain = build_model(cfg).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def drawn_in(png: Path, colour: str, rows: tuple[float, float] = (0.0, 1.0), tolerance: int = 40) -> np.ndarray:
    """Return the [H,W] mask of a plot's pixels in a matplotlib colour ('C0' is the first line's), within a
    band of rows given as fractions of the height (0 = top); pixels outside the band are False."""
    from matplotlib.colors import to_rgb
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    target = np.round(np.array(to_rgb(colour)) * 255).astype(np.int16)
    mask = np.abs(pixels - target).max(axis=-1) <= tolerance
    height = mask.shape[0]
    mask[: int(rows[0] * height)] = False
    mask[int(rows[1] * height):] = False
    return mask
