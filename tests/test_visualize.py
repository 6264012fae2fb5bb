"""Drawing detections and loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import drawn_in
from maskrcnn.errors import UserError
from maskrcnn.visualize import draw_instances, plot_loss_curve


def _output(score: float = 0.9) -> dict:
    masks = torch.zeros(1, 100, 120, dtype=torch.bool)
    masks[0, 40:70, 50:90] = True
    return {"boxes": torch.tensor([[50.0, 40.0, 90.0, 70.0]]), "scores": torch.tensor([score]),
            "labels": torch.tensor([2]), "masks": masks}


def test_draw_instances_colours_the_mask_only() -> None:
    image = np.full((100, 120, 3), 128, dtype=np.uint8)
    out = np.asarray(draw_instances(image, _output(), ["a", "b"]))
    assert out.shape == image.shape
    inside = out[45:65, 55:85]  # well inside the mask, away from outline and label
    assert (np.abs(inside.astype(int) - 128).sum(axis=2) > 0).all()
    far = out[85:, :30]  # away from the mask, its box and its label
    assert (far == 128).all()


def test_draw_instances_threshold_and_empty() -> None:
    image = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(draw_instances(image, _output(0.2), None, 0.5)), image)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 100, 120, dtype=torch.bool)}
    assert isinstance(draw_instances(image, empty, ["a"]), Image.Image)
    no_masks = {k: v for k, v in _output().items() if k != "masks"}
    assert np.asarray(draw_instances(image, no_masks, None)).shape == image.shape


def test_loss_curve_png(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    rows = [{"iter": i, "total_loss": 2.0 / (i + 1), "loss_mask": 0.7 / (i + 1), "lr": 0.01} for i in range(20)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"iter\": 20, \"tota")  # torn last line
    out = plot_loss_curve(log, tmp_path / "loss.png")
    assert not drawn_in(out, "C2").any()  # two series: the learning rate is not a loss
    total, mask = (np.nonzero(drawn_in(out, colour))[0] for colour in ("C0", "C1"))  # their pixels' rows
    assert len(total) > 500 and len(mask) > 300
    assert total.mean() < mask.mean()  # the total loss is drawn above the mask loss
    with pytest.raises(UserError, match="does not exist"):
        plot_loss_curve(tmp_path / "nope.jsonl", tmp_path / "x.png")
