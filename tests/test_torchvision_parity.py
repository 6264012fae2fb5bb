"""Our network, given a torchvision Mask R-CNN's weights, returns torchvision's detections."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from maskrcnn.engine.compare import Tolerances, detection_differences
from support import (FAST_PATH, FAST_PATH_MATCHED, decisive_torchvision_model, detect_both, detect_on_random_image,
                     ours_from_torchvision, plain_layout_copy)

# Images are resized to support.PARITY_MIN_SIZE (320 px, not the presets' 800, so the test stays quick).
VARIANTS = {"torchvision-r50-fpn": maskrcnn_resnet50_fpn, "torchvision-r50-fpn-v2": maskrcnn_resnet50_fpn_v2}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model_pair(request, tmp_path_factory):
    reference = decisive_torchvision_model(VARIANTS[request.param])
    return reference, ours_from_torchvision(reference, request.param, tmp_path_factory.mktemp("weights"))


def assert_same_detections(expected: dict, actual: dict, tol: Tolerances = FAST_PATH,
                           min_matched: float = FAST_PATH_MATCHED) -> None:
    assert len(expected["boxes"]) > 0, "the test weights should give detections"
    assert detection_differences(expected, actual, tol, min_matched) == []


@pytest.mark.parametrize("size", [(300, 400), (257, 189), (480, 360)])
def test_single_images_match_torchvision(model_pair, size):
    expected, actual = detect_on_random_image(*model_pair, size)
    assert_same_detections(expected, actual)
    assert actual["masks"].dtype == torch.bool and actual["masks"].shape[-2:] == size


def test_batch_of_two_sizes_matches_torchvision(model_pair):
    reference, ours = model_pair
    torch.manual_seed(7)
    expected, actual = detect_both(reference, ours, [torch.rand(3, 240, 320), torch.rand(3, 350, 200)])
    for e, a in zip(expected, actual):
        assert_same_detections(e, a)


def test_plain_layout_is_bit_identical_to_torchvision(model_pair):
    """Without channels-last and BN folding, ours computes exactly torchvision's sums."""
    reference, fast = model_pair
    plain = plain_layout_copy(fast)
    torch.manual_seed(11)
    (expected,), (actual,) = detect_both(reference, plain, [torch.rand(3, 300, 400)])
    assert_same_detections(expected, actual, Tolerances(box=0.0, score=0.0, mask_iou=1.0), min_matched=1.0)
