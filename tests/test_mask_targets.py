"""mask_targets: each RoI's matched GT mask resampled into a size x size binary grid."""

from __future__ import annotations

import torch

from maskrcnn.modeling.roi_heads import mask_targets


def _rect(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    """uint8 mask with pixels x1..x2-1, y1..y2-1 set: the box [x1, y1, x2, y2] in edge coordinates."""
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def test_roi_equal_to_rectangle_is_all_ones():
    gt = _rect(64, 64, 8, 16, 40, 48)[None]
    box = torch.tensor([[8.0, 16, 40, 48]])
    out = mask_targets(gt, torch.tensor([0]), box, 28)
    # RoIAlign aligned, 32 px over 28 bins: the outermost sample points sit at pixel coordinate
    # 7.79 / 39.21, i.e. 0.79 inside the rectangle -> every bin averages >= 0.79^2 > 0.5.
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert torch.equal(out, torch.ones(1, 28, 28))


def test_roi_twice_as_wide_gives_left_half():
    gt = _rect(64, 96, 8, 16, 40, 48)[None]
    box = torch.tensor([[8.0, 16, 72, 48]])  # 64 px wide: the mask covers the left 32
    out = mask_targets(gt, torch.tensor([0]), box, 28)[0]
    # bins are 64/28 = 2.29 px wide: bins 0..13 end at 8 + 14*2.29 = 40 (inside), bin 14's
    # samples (x = 39.88, 40.64, 41.4 in pixel coords) average 0.04 -> 0.  Rows all cover the mask.
    assert out.sum(dim=0).tolist() == [28.0] * 14 + [0.0] * 14
    assert out.sum(dim=1).tolist() == [14.0] * 28


def test_roi_twice_as_tall_gives_top_half():
    gt = _rect(96, 64, 8, 16, 40, 48)[None]
    out = mask_targets(gt, torch.tensor([0]), torch.tensor([[8.0, 16, 40, 80]]), 28)[0]
    assert out.sum(dim=1).tolist() == [28.0] * 14 + [0.0] * 14


def test_multiple_gts_indexed_by_matched_gt():
    gts = torch.stack([_rect(64, 64, 4, 4, 20, 20), _rect(64, 64, 40, 30, 60, 60)])
    box0, box1 = [4.0, 4, 20, 20], [40.0, 30, 60, 60]  # disjoint rectangles
    boxes = torch.tensor([box0, box1, box1, box0])
    out = mask_targets(gts, torch.tensor([0, 1, 0, 1]), boxes, 28)
    assert out.shape == (4, 28, 28)
    # each RoI on its own GT: all ones; on the other GT's (disjoint) mask: all zeros
    assert out.sum(dim=(1, 2)).tolist() == [784.0, 784.0, 0.0, 0.0]


def test_partial_overlap_quadrant():
    gt = _rect(64, 64, 16, 16, 48, 48)[None]
    # RoI [32,32,64,64]: the mask covers its top-left quadrant (x, y in 32..47 = 14 bins of 1.14 px;
    # bin 13 samples at 46.6 / 47.2 -> 1, 0.79; bin 14 at 47.8 / 48.4 -> 0.21, 0)
    out = mask_targets(gt, torch.tensor([0]), torch.tensor([[32.0, 32, 64, 64]]), 28)[0]
    expected = torch.zeros(28, 28)
    expected[:14, :14] = 1
    assert torch.equal(out, expected)


def test_no_rois():
    out = mask_targets(torch.ones(2, 10, 10, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), 14)
    assert out.shape == (0, 14, 14)
