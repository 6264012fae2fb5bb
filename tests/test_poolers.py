"""FPN level assignment, RoIPool / RoIAlign on a known feature map, and level routing."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align, roi_pool

from maskrcnn.config import PoolerConfig
from maskrcnn.modeling.poolers import RoIPooler, assign_levels, boxes_to_rois


def _square(size: float, x0: float = 0.0) -> list[float]:
    return [x0, x0, x0 + size, x0 + size]


def test_assign_levels_canonical():
    boxes = torch.tensor(
        [
            _square(224),  # k = floor(4 + log2(224/224)) = 4 -> index 4 - 2 = 2
            _square(112),  # 4 - 1 = 3 -> 1
            _square(448),  # 4 + 1 = 5 -> 3
            _square(10),  # 4 + log2(10/224) = -0.49 -> -1, clamped to 2 -> 0
            _square(2000),  # 4 + 3.16 = 7 -> clamped to 5 -> 3
            _square(223),  # floor(3.9935) = 3 -> 1 (just under the canonical size)
            [0.0, 0, 112, 448],  # sqrt(112*448) = 224 -> 4 -> 2
            _square(56),  # 4 - 2 = 2 -> 0
        ]
    )
    out = assign_levels(boxes, min_level=2, max_level=5, canonical_size=224, canonical_level=4)
    assert out.dtype == torch.int64
    assert out.tolist() == [2, 1, 3, 0, 3, 1, 2, 0]


def test_boxes_to_rois_prefixes_image_index():
    rois = boxes_to_rois([torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4), torch.tensor([[5.0, 6, 7, 8]] * 2)])
    assert rois.tolist() == [[0, 1, 2, 3, 4], [2, 5, 6, 7, 8], [2, 5, 6, 7, 8]]


def _ramp() -> torch.Tensor:
    """[1,1,8,8] feature f(y, x) = 10*y + x."""
    y = torch.arange(8.0)[:, None]
    x = torch.arange(8.0)[None, :]
    return (10 * y + x)[None, None]


def test_roipool_takes_bin_maxima():
    rois = torch.tensor([[0.0, 0, 0, 7, 7]])
    out = roi_pool(_ramp(), rois, (2, 2), 1.0)
    # box [0,7] covers pixels 0..7 (8 of them, end inclusive): bins x in 0..3 and 4..7, same for y;
    # the max of 10y + x in each bin is at its bottom-right pixel: (3,3)=33, (3,7)=37, (7,3)=73, (7,7)=77
    assert out[0, 0].tolist() == [[33.0, 37.0], [73.0, 77.0]]
    # the pooler with type roipool gives the same
    pooler = RoIPooler(PoolerConfig(type="roipool", output_size=2), [1])
    assert pooler([_ramp()], [torch.tensor([[0.0, 0, 7, 7]])])[0, 0].tolist() == [[33.0, 37.0], [73.0, 77.0]]


def test_roialign_bilinear_samples_at_bin_centres():
    f = _ramp()
    rois = torch.tensor([[0.0, 0, 0, 8, 8]])
    aligned = roi_align(f, rois, (2, 2), 1.0, sampling_ratio=1, aligned=True)
    # aligned: the box is shifted by -0.5 px -> [-0.5, 7.5], bins 4 px, centres at 1.5 and 5.5;
    # f is linear, so bilinear sampling gives 10*y + x exactly: 16.5, 20.5, 56.5, 60.5
    torch.testing.assert_close(aligned[0, 0], torch.tensor([[16.5, 20.5], [56.5, 60.5]]))
    legacy = roi_align(f, rois, (2, 2), 1.0, sampling_ratio=1, aligned=False)
    # not aligned: [0, 8], centres at 2 and 6: 22, 26, 62, 66
    torch.testing.assert_close(legacy[0, 0], torch.tensor([[22.0, 26.0], [62.0, 66.0]]))
    # the half-pixel shift: 0.5 in x (+0.5) and in y (+5) = 5.5 everywhere
    torch.testing.assert_close(legacy - aligned, torch.full_like(aligned, 5.5))


def test_roialign_box_0_7():
    rois = torch.tensor([[0.0, 0, 0, 7, 7]])
    aligned = roi_align(_ramp(), rois, (2, 2), 1.0, sampling_ratio=1, aligned=True)
    # [-0.5, 6.5], bins 3.5: centres 1.25 and 4.75 -> 10*1.25 + 1.25 = 13.75, ...
    torch.testing.assert_close(aligned[0, 0], torch.tensor([[13.75, 17.25], [48.75, 52.25]]))
    legacy = roi_align(_ramp(), rois, (2, 2), 1.0, sampling_ratio=1, aligned=False)
    # [0, 7], centres 1.75 and 5.25
    torch.testing.assert_close(legacy[0, 0], torch.tensor([[19.25, 22.75], [54.25, 57.75]]))


@pytest.mark.parametrize("aligned,expected", [(True, [[16.5, 20.5], [56.5, 60.5]]), (False, [[22.0, 26.0], [62.0, 66.0]])])
def test_pooler_single_level_uses_its_scale_and_alignment(aligned, expected):
    # One level of stride 2: an image-space box [0,0,16,16] is [0,0,8,8] on the feature map.
    pooler = RoIPooler(PoolerConfig(output_size=2, sampling_ratio=1, aligned=aligned), [2])
    out = pooler([_ramp()], [torch.tensor([[0.0, 0, 16, 16]])])
    torch.testing.assert_close(out[0, 0], torch.tensor(expected))


def test_pooler_routes_boxes_to_levels():
    # Two levels, strides 4 and 8 (P2, P3); per image constant features so the output shows the
    # level (and the image) each box was pooled from: P2 = 1 / 3, P3 = 2 / 4 for images 0 / 1.
    p2 = torch.ones(2, 1, 32, 32)
    p2[1] = 3.0
    p3 = torch.full((2, 1, 16, 16), 2.0)
    p3[1] = 4.0
    pooler = RoIPooler(PoolerConfig(output_size=2, sampling_ratio=2), [4, 8])
    assert (pooler.min_level, pooler.max_level) == (2, 3)
    small = [10.0, 10, 30, 30]  # 20 px: level floor(4 + log2(20/224)) = 0 -> clamped to 2
    large = [0.0, 0, 112, 112]  # 112 px: level 3
    huge = [0.0, 0, 127, 127]  # level 3 (4 clamped to the top level present)
    out = pooler([p2, p3], [torch.tensor([small, large]), torch.tensor([large, small, huge])])
    assert out.shape == (5, 1, 2, 2)
    expected = torch.tensor([1.0, 2.0, 4.0, 3.0, 4.0])[:, None, None, None].expand(5, 1, 2, 2)
    torch.testing.assert_close(out, expected)


def test_pooler_no_boxes():
    pooler = RoIPooler(PoolerConfig(output_size=7), [4, 8, 16, 32])
    feats = [torch.rand(1, 3, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    assert pooler(feats, [torch.zeros(0, 4)]).shape == (0, 3, 7, 7)


@pytest.mark.parametrize("mode", ["inference", "autocast", "grad"])
def test_pooling_in_threads_matches_one_thread(monkeypatch, mode):
    """Chunks of RoIs pooled from worker threads give the same values (and gradients) as one call."""
    from maskrcnn.modeling import poolers

    torch.manual_seed(0)
    features = [torch.rand(2, 8, 64 // s, 64 // s, requires_grad=mode == "grad") for s in (1, 2, 4, 8)]
    boxes = []
    for _ in range(2):
        xy = torch.rand(150, 2) * 200
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(150, 2) * 200], dim=1))
    pooler = RoIPooler(PoolerConfig(output_size=7, sampling_ratio=2, aligned=True), [4, 8, 16, 32])

    def run(min_rois_per_thread: int):
        monkeypatch.setattr(poolers, "MIN_ROIS_PER_THREAD", min_rois_per_thread)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        if mode == "grad":
            out = pooler(features, boxes)
            grads = torch.autograd.grad(out.square().sum(), features, allow_unused=True)
            return out.detach(), grads
        context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else torch.inference_mode()
        with context:
            return pooler([f.bfloat16() if mode == "autocast" else f for f in features], boxes), ()

    calls = []
    monkeypatch.setattr(poolers.CpuRoIAlign, "apply", lambda *a, f=poolers.CpuRoIAlign.apply: calls.append(1) or f(*a))
    threaded, threaded_grads = run(8)
    assert calls, "the threaded path should have run"
    single, single_grads = run(10**9)
    assert threaded.dtype == single.dtype
    assert torch.equal(threaded, single)
    for a, b in zip(threaded_grads, single_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_vectorised_backward_matches_torchvision(aligned, sampling_ratio):
    """Our RoIAlign backward gives torchvision's gradient: boxes inside, across and outside the map edges."""
    from maskrcnn.modeling.poolers import roi_align_backward

    torch.manual_seed(0)
    n, c, h, w = 3, 5, 13, 17
    xy = torch.rand(60, 2) * torch.tensor([w + 6.0, h + 6.0]) * 4 - 12  # some start off the map
    wh = torch.rand(60, 2) * 40 + torch.tensor([0.0, 0.0])  # some thinner than a pixel
    boxes = torch.cat([xy, xy + wh], dim=1)
    rois = torch.cat([torch.randint(0, n, (60, 1)).float(), boxes], dim=1)
    grad = torch.randn(60, c, 7, 6)
    expected = torch.ops.torchvision._roi_align_backward(grad, rois, 0.25, 7, 6, n, c, h, w, sampling_ratio, aligned)
    ours = roi_align_backward(grad, rois, torch.Size([n, c, h, w]), 0.25, sampling_ratio, aligned)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_pooler_gradient_matches_torchvision_autograd():
    """Through the pooler (FPN levels, autograd), the feature gradients equal torchvision's roi_align's."""
    from torchvision.ops import roi_align as tv_roi_align

    torch.manual_seed(1)
    strides = [4, 8, 16, 32]
    features = [torch.rand(2, 6, 256 // s, 192 // s, requires_grad=True) for s in strides]
    boxes = []
    for _ in range(2):
        xy = torch.rand(60, 2) * 180
        boxes.append(torch.cat([xy, xy + 2 + torch.rand(60, 2) ** 2 * 300], dim=1))
    cfg = PoolerConfig(output_size=7, sampling_ratio=1, aligned=True)
    pooler = RoIPooler(cfg, strides)
    out = pooler(features, boxes)
    ours = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), features[:3])

    # The same pooling with torchvision's op and autograd, level by level.
    from maskrcnn.modeling.poolers import assign_levels, boxes_to_rois
    rois = boxes_to_rois(boxes)
    levels = assign_levels(rois[:, 1:], 2, 5, cfg.canonical_size, cfg.canonical_level)
    reference = out.new_zeros(out.shape)
    for level, (feature, stride) in enumerate(zip(features, strides)):
        index = torch.nonzero(levels == level).squeeze(1)
        reference = reference.index_put((index,), tv_roi_align(feature, rois[index], 7, 1 / stride, 1, True))
    torch.testing.assert_close(out, reference)
    expected = torch.autograd.grad((reference * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), features[:3])
    assert all(e.abs().sum() > 0 for e in expected)  # boxes on levels 2-4 (none big enough for 5)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
