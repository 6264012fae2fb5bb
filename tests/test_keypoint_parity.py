"""Our network, given torchvision Keypoint R-CNN weights, returns torchvision's boxes, scores and keypoints."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import keypointrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as torchvision_heatmaps_to_keypoints

from maskrcnn.engine.compare import Tolerances, detection_differences, match_detections
from maskrcnn.modeling.keypoint_head import heatmaps_to_keypoints
from support import (FAST_PATH, FAST_PATH_MATCHED, PARITY_MAX_SIZE, PARITY_MIN_SIZE, detect_both,
                     detect_on_random_image, ours_from_torchvision, plain_layout_copy)

# Keypoint scores (heat-map logits, up to ~80 on these weights) agree to 1e-4 of the largest one.
KEYPOINT_SCORE_RTOL = 1e-4


def decisive_keypoint_model():
    """Return a seeded torchvision Keypoint R-CNN (person + background) that detects dozens of boxes."""
    torch.manual_seed(0)
    model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2).eval()
    with torch.no_grad():
        # Random weights give person scores near the 0.05 threshold; lift them so ~30-50 boxes pass.
        model.roi_heads.box_predictor.cls_score.bias[1] += 2.0
    model.transform.min_size = (PARITY_MIN_SIZE,)
    model.transform.max_size = PARITY_MAX_SIZE
    return model


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    reference = decisive_keypoint_model()
    folder = tmp_path_factory.mktemp("weights")
    return reference, ours_from_torchvision(reference, "torchvision-keypoint-r50-fpn", folder)


def assert_same_keypoint_detections(expected: dict, actual: dict, tol: Tolerances = FAST_PATH,
                                    min_matched: float = FAST_PATH_MATCHED, score_rtol: float = KEYPOINT_SCORE_RTOL):
    assert len(expected["boxes"]) >= 10, "the test weights should give detections"
    assert detection_differences(expected, actual, tol, min_matched) == []
    partner = match_detections(expected, actual, tol)
    matched = partner >= 0
    e_kp, a_kp = expected["keypoints"][matched], actual["keypoints"][partner[matched]]
    assert a_kp.shape[1:] == (17, 3)
    # Keypoints within the same tolerance as boxes (an arg-max that moved would be a pixel or more off),
    # but for at most 3% of them when near-ties are allowed (min_matched < 1): on random weights two
    # heat-map cells can tie to ~1e-6, and another CPU's rounding picks the other one (15 of 901 on an
    # AVX2 CPU, none on the AVX-512 one the tolerances were first set on).
    # The same share may differ in score (a keypoint whose arg-max went to the other cell has its score).
    e_sc, a_sc = expected["keypoints_scores"][matched], actual["keypoint_scores"][partner[matched]]
    off = ((e_kp[..., :2] - a_kp[..., :2]).abs().amax(-1) > tol.box) | (
        (a_sc - e_sc).abs() > score_rtol * float(e_sc.abs().max()))
    allowed = 0 if min_matched >= 1.0 else int(0.03 * off.numel())
    assert int(off.sum()) <= allowed, f"{int(off.sum())} of {off.numel()} keypoints moved more than {tol.box} px or changed score"
    assert torch.equal(a_kp[..., 2], torch.ones_like(a_kp[..., 2]))


@pytest.mark.parametrize("size", [(300, 400), (257, 189)])
def test_keypoints_match_torchvision(model_pair, size):
    expected, actual = detect_on_random_image(*model_pair, size)
    assert_same_keypoint_detections(expected, actual)
    # Keypoints live in input-image pixels, as boxes do (boxes under a pixel wide decode as one pixel wide).
    assert float(actual["keypoints"][..., 0].max()) <= size[1] + 1 and float(actual["keypoints"][..., 1].max()) <= size[0] + 1


def test_plain_layout_is_bit_identical_to_torchvision(model_pair):
    """Without channels-last and BN folding, boxes and keypoints are exactly torchvision's."""
    reference, fast = model_pair
    plain = plain_layout_copy(fast)
    torch.manual_seed(11)
    expected, actual = detect_both(reference, plain, [torch.rand(3, 300, 400), torch.rand(3, 350, 200)])
    for e, a in zip(expected, actual):
        # Keypoint scores: our bicubic resize is a matrix product, summing in another order (~1e-6).
        assert_same_keypoint_detections(e, a, Tolerances(box=0.0, score=0.0, mask_iou=1.0), 1.0, score_rtol=1e-5)


def test_heatmap_decoding_matches_torchvision():
    """Batched bicubic arg-max decoding equals torchvision's per-box loop, boxes of any size."""
    torch.manual_seed(0)
    maps = torch.nn.functional.avg_pool2d(torch.randn(40, 5, 56, 56), 5, 1, 2) * 3
    corner = torch.rand(40, 2) * 300
    boxes = torch.cat([corner, corner + torch.rand(40, 2) * 300 + 0.3], dim=1)
    boxes[0, 2:] = boxes[0, :2] + 0.5  # below one pixel: clamped to one
    expected, expected_scores = torchvision_heatmaps_to_keypoints(maps, boxes)
    keypoints, scores = heatmaps_to_keypoints(maps, boxes)
    assert torch.equal(keypoints, expected)
    assert torch.allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_keypoint_loss_matches_torchvision():
    """Targets (cell of each labelled keypoint inside its RoI) and the loss equal torchvision's."""
    from torchvision.models.detection.roi_heads import keypointrcnn_loss

    from maskrcnn.modeling.keypoint_head import keypoint_loss, keypoint_targets

    torch.manual_seed(0)
    corner = torch.rand(30, 2) * 100
    proposals = torch.cat([corner, corner + torch.rand(30, 2) * 80 + 1], dim=1)
    gt = torch.cat([torch.rand(4, 17, 2) * 180, torch.randint(0, 3, (4, 17, 1)).float()], dim=2)
    matched = torch.randint(0, 4, (30,))
    gt[0, 0, :2] = proposals[matched == 0][0, 2:] if (matched == 0).any() else gt[0, 0, :2]  # a far-edge point
    logits = torch.randn(30, 17, 56, 56)
    expected = keypointrcnn_loss(logits, [proposals], [gt], [matched])
    index, valid = keypoint_targets(gt[matched], proposals, 56)
    assert valid.sum() > 20
    assert torch.allclose(keypoint_loss(logits, index, valid), expected, rtol=1e-6, atol=1e-6)
