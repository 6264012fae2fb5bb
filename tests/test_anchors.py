"""Base anchors and their tiling over feature maps, against hand-computed coordinates."""

from __future__ import annotations

import math

import pytest
import torch

from maskrcnn.config import AnchorConfig, load_config
from maskrcnn.modeling.anchors import AnchorGenerator, base_anchors

S2 = math.sqrt(2.0)


def test_base_anchors_size32_three_ratios():
    out = base_anchors([32], [0.5, 1.0, 2.0], round_to_int=False)
    # ratio r = h/w, area 32²: w = 32/√r, h = 32·√r
    #   r=0.5: w = 32·√2 = 45.25, h = 32/√2 = 22.63;  r=1: 32x32;  r=2: w = 22.63, h = 45.25
    w05, h05 = 32 * S2, 32 / S2
    expected = torch.tensor(
        [
            [-w05 / 2, -h05 / 2, w05 / 2, h05 / 2],
            [-16.0, -16.0, 16.0, 16.0],
            [-h05 / 2, -w05 / 2, h05 / 2, w05 / 2],
        ]
    )
    torch.testing.assert_close(out, expected)
    widths, heights = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    torch.testing.assert_close(widths * heights, torch.full((3,), 1024.0))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0]))


def test_base_anchors_rounded():
    out = base_anchors([32], [0.5, 1.0, 2.0], round_to_int=True)
    # half sizes 22.63 -> 23 and 11.31 -> 11 (torchvision's rounding)
    expected = torch.tensor([[-23.0, -11, 23, 11], [-16.0, -16, 16, 16], [-11.0, -23, 11, 23]])
    assert torch.equal(out, expected)


def test_base_anchors_ratio_major_order():
    out = base_anchors([32, 64], [0.5, 1.0, 2.0], round_to_int=False)
    assert out.shape == (6, 4)
    widths = out[:, 2] - out[:, 0]
    heights = out[:, 3] - out[:, 1]
    # rows: (r=.5, 32), (r=.5, 64), (r=1, 32), (r=1, 64), (r=2, 32), (r=2, 64)
    torch.testing.assert_close(widths, torch.tensor([32 * S2, 64 * S2, 32, 64, 32 / S2, 64 / S2]))
    torch.testing.assert_close(heights, torch.tensor([32 / S2, 64 / S2, 32, 64, 32 * S2, 64 * S2]))


def _generator(offset=0.0, stride_from_image=False, sizes=None):
    cfg = AnchorConfig(sizes=sizes or [[32]], aspect_ratios=[0.5, 1.0, 2.0], offset=offset,
                       stride_from_image=stride_from_image)
    return AnchorGenerator(cfg, [16] * len(cfg.sizes))


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_grid_location_major_anchor_minor(offset):
    gen = _generator(offset=offset)
    assert gen.num_anchors_per_location == 3
    feature = torch.zeros(1, 4, 2, 3)  # H=2, W=3
    (anchors,) = gen([feature], (32, 48))
    assert anchors.shape == (2 * 3 * 3, 4)
    cell = base_anchors([32], [0.5, 1.0, 2.0], False)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    for y in range(2):
        for x in range(3):
            for a in range(3):
                row = (y * 3 + x) * 3 + a
                cx, cy = (x + offset) * 16, (y + offset) * 16  # offset 0: (16x, 16y); 0.5: (x+.5)*16
                torch.testing.assert_close(centres[row], torch.tensor([cx, cy]))
                torch.testing.assert_close(anchors[row], cell[a] + torch.tensor([cx, cy, cx, cy]))
    # spot checks: location (y=1, x=2) is the last one; its square anchor (a=1)
    c = 0.5 * 16 if offset else 0.0
    torch.testing.assert_close(anchors[5 * 3 + 1], torch.tensor([32 + c - 16, 16 + c - 16, 32 + c + 16, 16 + c + 16]))


def test_stride_from_image_uses_padded_size_over_grid():
    gen = _generator(stride_from_image=True)
    # padded 40x50 over a 2x3 grid: stride_y = 40 // 2 = 20, stride_x = 50 // 3 = 16
    assert gen.level_strides((2, 3), (40, 50), 0) == (20, 16)
    (anchors,) = gen([torch.zeros(1, 1, 2, 3)], (40, 50))
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).view(2, 3, 3, 2)[:, :, 0]
    torch.testing.assert_close(centres[..., 0], torch.tensor([[0.0, 16, 32], [0.0, 16, 32]]))
    torch.testing.assert_close(centres[..., 1], torch.tensor([[0.0, 0, 0], [20.0, 20, 20]]))
    nominal = _generator(stride_from_image=False)
    assert nominal.level_strides((2, 3), (40, 50), 0) == (16, 16)


def test_multi_level_one_tensor_per_level():
    gen = AnchorGenerator(AnchorConfig(sizes=[[32], [64]]), [4, 8])
    out = gen([torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)], (16, 16))
    assert [a.shape for a in out] == [(4 * 4 * 3, 4), (2 * 2 * 3, 4)]
    # second level: stride 8, location (y=1, x=1) centre (8, 8), square anchor 64 wide
    torch.testing.assert_close(out[1][3 * 3 + 1], torch.tensor([8.0 - 32, 8 - 32, 8 + 32, 8 + 32]))


def test_c4_config_one_level_fifteen_anchors():
    cfg = load_config(None, ["model.backbone.kind=c4", "model.box_head.type=res5",
                            "model.anchors.sizes=[[32,64,128,256,512]]"])
    gen = AnchorGenerator(cfg.model.anchors, [16])
    assert gen.num_anchors_per_location == 15
    (anchors,) = gen([torch.zeros(1, 1, 3, 5)], (48, 80))
    assert anchors.shape == (3 * 5 * 15, 4)
    # all 15 anchors of one location share its centre
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).view(15, 15, 2)
    assert torch.allclose(centres, centres[:, :1].expand(-1, 15, -1))


def test_level_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator(AnchorConfig(), [16])  # 5 size levels, 1 stride
