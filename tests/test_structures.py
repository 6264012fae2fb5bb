"""Box geometry, the box coder and mask pasting against hand-computed numbers (and torchvision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskrcnn.structures import (BOX_SCALE_CLAMP, BoxCoder, RLEMasks, clip_boxes, detections_to_cpu, pairwise_ioa,
                                 pairwise_iou, paste_masks)


# ---- IoU / IoA ----------------------------------------------------------------------------------


def test_iou_identical_disjoint_half_overlap():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor(
        [
            [0.0, 0, 10, 10],  # identical: 100 / 100 = 1
            [20.0, 20, 30, 30],  # disjoint: 0
            [5.0, 0, 15, 10],  # inter 5*10 = 50, union 100 + 100 - 50 = 150 -> 1/3
            [10.0, 0, 20, 10],  # touching edge: inter 0
        ]
    )
    iou = pairwise_iou(a, b)
    assert iou.shape == (1, 4)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.0, 1 / 3, 0.0]]))


def test_iou_matrix_shape_and_symmetry():
    a = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 20, 20]])
    b = torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [2.0, 2, 4, 4]])
    iou = pairwise_iou(a, b)
    assert iou.shape == (2, 3)
    # [0,0,20,20] contains all three: [0,0,10,10] -> 100 / 400; [5,0,15,10] -> 100 / 400;
    # [2,2,4,4] -> 4 / 400.  [0,0,10,10] vs [2,2,4,4]: 4 / 100
    expected = torch.tensor([[1.0, 1 / 3, 0.04], [0.25, 0.25, 0.01]])
    torch.testing.assert_close(iou, expected)
    torch.testing.assert_close(pairwise_iou(b, a), expected.T)


def test_ioa_divides_by_area_of_second_argument():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[2.0, 2, 4, 4], [5.0, 0, 15, 10], [20.0, 20, 30, 30]])
    # small box fully inside: 4 / 4 = 1; half overlap: 50 / 100 = 0.5; disjoint: 0
    torch.testing.assert_close(pairwise_ioa(a, b), torch.tensor([[1.0, 0.5, 0.0]]))
    # the other way round: inter / area(a) = 4 / 100, 50 / 100 ... (rows are b now)
    torch.testing.assert_close(pairwise_ioa(b, a), torch.tensor([[0.04], [0.5], [0.0]]))


def test_ioa_of_degenerate_box_is_finite():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[3.0, 3, 3, 3]])  # zero area: area clamped, intersection 0
    out = pairwise_ioa(a, b)
    assert torch.isfinite(out).all() and out.item() == 0.0


# ---- BoxCoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)])
def test_encode_hand_computed(weights):
    wx, wy, ww, wh = weights
    coder = BoxCoder(weights)
    ref = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    tgt = torch.tensor([[5.0, 0, 15, 10], [0.0, 0, 20, 5]])
    deltas = coder.encode(tgt, ref)
    # row 0: centre moves 10 - 5 = 5 px in x on a 10 px wide box -> dx = wx * 0.5; same size -> 0
    # row 1: centre (10, 2.5) vs (5, 5): dx = wx * 5/10, dy = wy * -2.5/10; w 20/10, h 5/10
    expected = torch.tensor(
        [
            [0.5 * wx, 0.0, 0.0, 0.0],
            [0.5 * wx, -0.25 * wy, ww * math.log(2.0), wh * math.log(0.5)],
        ]
    )
    torch.testing.assert_close(deltas, expected)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)])
def test_encode_decode_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    ref_xy = torch.rand(50, 2, generator=g) * 100
    ref = torch.cat([ref_xy, ref_xy + 1 + torch.rand(50, 2, generator=g) * 60], dim=1)
    tgt_xy = torch.rand(50, 2, generator=g) * 100
    tgt = torch.cat([tgt_xy, tgt_xy + 1 + torch.rand(50, 2, generator=g) * 60], dim=1)
    coder = BoxCoder(weights)
    decoded = coder.decode(coder.encode(tgt, ref), ref)
    assert decoded.shape == (50, 1, 4)
    torch.testing.assert_close(decoded[:, 0], tgt, rtol=1e-5, atol=1e-3)


def test_decode_hand_computed_and_class_specific_shape():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0, 10, 10]])
    # class 0: zero deltas -> the reference; class 1: dx = 5 / 10 = 0.5 -> shift by 5 px,
    # dw = 5*log 2 / 5 = log 2 -> width 20 around centre 10 -> [0, 0, 20, 10]
    deltas = torch.tensor([[0.0, 0, 0, 0, 5.0, 0, 5 * math.log(2.0), 0]])
    out = coder.decode(deltas, ref)
    assert out.shape == (1, 2, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 0, 10, 10]))
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 0, 20, 10]))


def test_decode_clamps_huge_scale():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    ref = torch.tensor([[0.0, 0, 10, 10]])
    out = coder.decode(torch.tensor([[0.0, 0, 100.0, 100.0]]), ref)
    assert torch.isfinite(out).all()
    # exp(log(1000/16)) * 10 = 625 px wide, centred on 5: [5 - 312.5, 5 + 312.5]
    assert BOX_SCALE_CLAMP == pytest.approx(math.log(1000 / 16))
    torch.testing.assert_close(out[0, 0], torch.tensor([-307.5, -307.5, 317.5, 317.5]))
    # negative dw is not clamped: exp(-2) * 10 wide
    small = coder.decode(torch.tensor([[0.0, 0, -2.0, 0]]), ref)[0, 0]
    torch.testing.assert_close(small[2] - small[0], torch.tensor(10 * math.exp(-2.0)))


# ---- clip_boxes ---------------------------------------------------------------------------------


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -3, 120, 90], [10.0, 20, 30, 40], [150.0, 100, 160, 110]])
    out = clip_boxes(boxes, height=80, width=100)
    expected = torch.tensor([[0.0, 0, 100, 80], [10.0, 20, 30, 40], [100.0, 80, 100, 80]])
    torch.testing.assert_close(out, expected)
    # any leading shape
    out3 = clip_boxes(boxes.view(3, 1, 4).expand(3, 2, 4), 80, 100)
    assert out3.shape == (3, 2, 4)
    torch.testing.assert_close(out3[:, 1], expected)


# ---- paste_masks --------------------------------------------------------------------------------


def test_paste_full_mask_inside_image():
    masks = torch.ones(1, 28, 28)
    out = paste_masks(masks, torch.tensor([[10.0, 20, 40, 50]]), 100, 100)
    assert out.dtype == torch.bool and out.shape == (1, 100, 100)
    # Hand computation (x; y is the same with +10): the 28x28 mask is padded to 30x30 (zero
    # border) and the box grown by 30/28 around its centre 25: half width 15*30/28 = 16.07, so
    # [8.93, 41.07] truncated to [8, 41] -> 34 pixels.  Pixel j of the span samples the padded
    # mask at (j + .5) * 30/34 - .5: j=0 -> 0 (clamped, border 0) -> off; j=1 -> 0.82 -> 0.82 on;
    # j=32 -> 28.18 -> 0.82 on; j=33 -> 29.06 -> border -> off.  So x in 9..40, y in 19..50.
    expected = torch.zeros(100, 100, dtype=torch.bool)
    expected[19:51, 9:41] = True
    assert int(out.sum()) == 32 * 32
    assert torch.equal(out[0], expected)


def test_paste_box_over_border_is_cut():
    masks = torch.ones(2, 28, 28)
    boxes = torch.tensor([[-10.0, -10, 20, 20], [30.0, 30, 60, 60]])
    out = paste_masks(masks, boxes, 50, 50)
    assert out.shape == (2, 50, 50)
    # Box 0: centre 5, grown half 16.07 -> [-11.07, 21.07] truncated toward zero to [-11, 21],
    # 33 pixels; j=0 and j=32 sample the zero border, j=1..31 are on -> pixels -10..20, of which
    # 0..20 lie in the image: 21 x 21.
    e0 = torch.zeros(50, 50, dtype=torch.bool)
    e0[:21, :21] = True
    assert torch.equal(out[0], e0) and int(out[0].sum()) == 441
    # Box 1: centre 45 -> [28.93, 61.07] -> [28, 61], 34 pixels, on at 29..60 -> 29..49 in image.
    e1 = torch.zeros(50, 50, dtype=torch.bool)
    e1[29:, 29:] = True
    assert torch.equal(out[1], e1) and int(out[1].sum()) == 441


def test_paste_box_entirely_outside_is_empty():
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[200.0, 200, 240, 240]]), 50, 60)
    assert out.shape == (1, 50, 60) and not out.any()


def test_paste_zero_masks():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), 30, 40)
    assert out.shape == (0, 30, 40) and out.dtype == torch.bool
    out = paste_masks(torch.zeros(3, 28, 28), torch.tensor([[0.0, 0, 10, 10]] * 3), 30, 40)
    assert out.shape == (3, 30, 40) and not out.any()


def test_paste_accepts_n1mm_masks_and_threshold():
    probs = torch.full((1, 1, 14, 14), 0.7)
    box = torch.tensor([[4.0, 4, 24, 24]])
    assert paste_masks(probs, box, 32, 32).any()
    assert not paste_masks(probs, box, 32, 32, threshold=0.8).any()


def test_paste_matches_torchvision_on_random_inputs():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    height, width, n = 61, 83, 24
    probs = torch.rand(n, 28, 28, generator=g)
    x1 = torch.rand(n, generator=g) * (width - 12)
    y1 = torch.rand(n, generator=g) * (height - 12)
    x2 = x1 + 2 + torch.rand(n, generator=g) * (width - 1 - x1 - 2)
    y2 = y1 + 2 + torch.rand(n, generator=g) * (height - 1 - y1 - 2)
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()

    ours = paste_masks(probs, boxes, height, width)
    ref_probs = paste_masks_in_image(probs[:, None], boxes, (height, width), padding=1)[:, 0]
    ref = ref_probs > 0.5
    # Only pixels whose probability is (numerically) exactly at the threshold may differ: the two
    # implementations sum the same bilinear terms in a different order.
    at_threshold = (ref_probs - 0.5).abs() < 1e-5
    assert torch.equal(ours[~at_threshold], ref[~at_threshold])
    assert ref.any() and (~ref).any()


def test_paste_chunking_does_not_change_result():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(7, 28, 28, generator=g)
    boxes = torch.tensor([[2.0, 3, 30, 20], [0, 0, 40, 40], [10, 5, 15, 39]] * 2 + [[1.0, 1, 9, 9]])
    whole = paste_masks(probs, boxes, 40, 40)
    tiny_chunks = paste_masks(probs, boxes, 40, 40, masks_per_batch=2)
    assert torch.equal(whole, tiny_chunks)


def test_exact_box_paste_returns_a_small_mask_as_it_was():
    """A perfect 28x28 mask of a small ellipse, pasted back: exact (grid_sample) vs integer-rounded box.

    Why the shapes and blobs presets paste with `detectron2`: torchvision's rounding grows small masks.
    """
    from maskrcnn.modeling.roi_heads import mask_targets
    from maskrcnn.structures import paste_masks_grid_sample

    yy, xx = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(96) + 0.5, indexing="ij")
    exact, rounded = [], []
    for a, b, cx, cy in [(7.3, 4.1, 40.2, 50.7), (11.6, 9.0, 47.9, 44.4), (15.2, 8.3, 51.1, 49.6)]:
        ellipse = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        ys, xs = torch.nonzero(ellipse, as_tuple=True)
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        target = mask_targets(ellipse[None].to(torch.uint8), torch.tensor([0]), box, 28)
        for paste, ious in ((paste_masks_grid_sample, exact), (paste_masks, rounded)):
            pasted = paste(target, box, 96, 96, 0.5)[0].bool()
            ious.append(((pasted & ellipse).sum() / (pasted | ellipse).sum()).item())
    assert min(exact) > 0.98
    assert sum(rounded) / 3 < sum(exact) / 3 - 0.02  # the rounded box costs IoU on objects this small


def test_detections_to_cpu_moves_tensors_and_keeps_the_rest():
    rles = RLEMasks([], 4, 4)
    output = {"boxes": torch.zeros(0, 4), "scores": np.zeros(0), "names": ["a"], "masks": rles}
    moved = detections_to_cpu(output)
    assert moved.keys() == output.keys() and moved["boxes"].device.type == "cpu"
    assert moved["scores"] is output["scores"] and moved["names"] == ["a"] and moved["masks"] is rles
