"""Our network, given a torchvision Mask R-CNN's weights, returns torchvision's detections."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from maskrcnn.config import load_config
from maskrcnn.engine.compare import Tolerances, detection_differences
from maskrcnn.modeling import build_model, import_state_dict
from conftest import plain_layout_copy

# Smaller than the presets' 800 px so the test stays quick; the resize rule itself is exercised.
MIN_SIZE, MAX_SIZE = 320, 512
VARIANTS = {"torchvision-r50-fpn": maskrcnn_resnet50_fpn, "torchvision-r50-fpn-v2": maskrcnn_resnet50_fpn_v2}


def decisive_torchvision_model(builder):
    """Return a seeded torchvision model whose scores and masks are not near-ties."""
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, num_classes=91).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.5)  # scores spread over ~0.35..0.5
        # Random mask logits saturate to exactly 0 or 1, and a bilinear sample halfway between the two
        # lands exactly on the 0.5 threshold; softer logits, shifted off zero, avoid such coin flips.
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.05)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.add_(0.3)
    model.transform.min_size = (MIN_SIZE,)
    model.transform.max_size = MAX_SIZE
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def model_pair(request, tmp_path_factory):
    reference = decisive_torchvision_model(VARIANTS[request.param])
    path = tmp_path_factory.mktemp("weights") / "tv.pth"
    torch.save(reference.state_dict(), path)
    cfg = load_config(request.param, [f"input.min_size_test={MIN_SIZE}", f"input.max_size_test={MAX_SIZE}"])
    ours = build_model(cfg)
    state = import_state_dict(ours, torch.load(path, weights_only=True))
    result = ours.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    assert not result.missing_keys and not unexpected
    return reference, ours


# Channels-last convolutions and folded frozen BN sum in another order than torchvision's NCHW
# convolutions: on these random weights boxes move by up to ~0.03 px and scores by ~2e-5, and one
# detection in a hundred may sit on an NMS near-tie that the last bit decides.
FAST_PATH = Tolerances(box=0.05, score=1e-4, mask_iou=0.99)
FAST_PATH_MATCHED = 0.98


def assert_same_detections(expected: dict, actual: dict, tol: Tolerances = FAST_PATH,
                           min_matched: float = FAST_PATH_MATCHED) -> None:
    assert len(expected["boxes"]) > 0, "the test weights should give detections"
    assert detection_differences(expected, actual, tol, min_matched) == []


@pytest.mark.parametrize("size", [(300, 400), (257, 189), (480, 360)])
def test_single_images_match_torchvision(model_pair, size):
    reference, ours = model_pair
    torch.manual_seed(sum(size))
    image = torch.rand(3, *size)
    with torch.no_grad():
        expected, actual = reference([image])[0], ours([image])[0]
    assert_same_detections(expected, actual)
    assert actual["masks"].dtype == torch.bool and actual["masks"].shape[-2:] == size


def test_batch_of_two_sizes_matches_torchvision(model_pair):
    reference, ours = model_pair
    torch.manual_seed(7)
    images = [torch.rand(3, 240, 320), torch.rand(3, 350, 200)]
    with torch.no_grad():
        expected, actual = reference(images), ours(images)
    for e, a in zip(expected, actual):
        assert_same_detections(e, a)


def test_plain_layout_is_bit_identical_to_torchvision(model_pair):
    """Without channels-last and BN folding, ours computes exactly torchvision's sums."""
    reference, fast = model_pair
    plain = plain_layout_copy(fast)
    torch.manual_seed(11)
    image = torch.rand(3, 300, 400)
    with torch.no_grad():
        expected, actual = reference([image])[0], plain([image])[0]
    assert_same_detections(expected, actual, Tolerances(box=0.0, score=0.0, mask_iou=1.0), min_matched=1.0)
