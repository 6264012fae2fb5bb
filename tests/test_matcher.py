"""IoU matching, low-quality matches, balanced sampling and crowd-aware labelling (hand-made IoUs)."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.modeling.matcher import BACKGROUND, IGNORE, Matcher, sample_balanced
from maskrcnn.modeling.rpn import label_with_crowd


def test_no_ground_truth_is_all_background():
    m = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    out = m(torch.zeros(0, 5))
    assert out.dtype == torch.int64 and out.tolist() == [BACKGROUND] * 5


def test_thresholds_and_ignore_band():
    m = Matcher(0.7, 0.3, allow_low_quality_matches=False)
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.7, 0.3, 0.29]])
    # >= 0.7 matched; [0.3, 0.7) ignored; < 0.3 background (both thresholds inclusive from below)
    assert m(iou).tolist() == [0, IGNORE, BACKGROUND, 0, IGNORE, BACKGROUND]


def test_each_prediction_takes_its_best_gt():
    m = Matcher(0.5, 0.5, allow_low_quality_matches=False)
    iou = torch.tensor([[0.8, 0.1, 0.6], [0.2, 0.75, 0.9]])
    assert m(iou).tolist() == [0, 1, 1]


def test_low_quality_matches_restored_including_ties():
    iou = torch.tensor(
        [
            [0.4, 0.4, 0.2, 0.1, 0.0],  # GT 0: best 0.4, tied at predictions 0 and 1
            [0.0, 0.1, 0.9, 0.0, 0.5],  # GT 1: best 0.9 at prediction 2
        ]
    )
    strict = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    assert strict.tolist() == [IGNORE, IGNORE, 1, BACKGROUND, IGNORE]
    loose = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # both tied predictions keep GT 0; prediction 4 (0.5 with GT 1, not GT 1's best) stays ignored
    assert loose.tolist() == [0, 0, 1, BACKGROUND, IGNORE]


def test_low_quality_match_below_low_threshold_and_argmax_kept():
    iou = torch.tensor(
        [
            [0.1, 0.05, 0.0],  # GT 0: best 0.1 (below the low threshold) at prediction 0
            [0.0, 0.2, 0.05],  # GT 1: best 0.2 at prediction 1
        ]
    )
    out = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert out.tolist() == [0, 1, BACKGROUND]
    # a prediction restored for GT 0 keeps its own best GT (here GT 1 overlaps it more)
    iou = torch.tensor([[0.4, 0.1], [0.5, 0.0]])
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [1, BACKGROUND]


def test_matcher_rejects_inverted_thresholds():
    with pytest.raises(ValueError):
        Matcher(0.3, 0.7, True)


def _labels(num_pos, num_neg, num_ignored):
    labels = torch.cat([torch.full((num_pos,), 2), torch.zeros(num_neg, dtype=torch.int64),
                        torch.full((num_ignored,), -1)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


def _check(labels, pos, neg):
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    both = torch.cat([pos, neg])
    assert len(torch.unique(both)) == len(both)  # no index twice
    assert not (labels[both] == -1).any()


def test_sample_balanced_full_batch():
    torch.manual_seed(0)
    labels = _labels(200, 1000, 50)
    pos, neg = sample_balanced(labels, 256, 0.5)
    assert (len(pos), len(neg)) == (128, 128)  # 256 * 0.5 = 128 of the 200 positives, negatives fill
    _check(labels, pos, neg)
    labels = _labels(100, 1000, 50)
    pos, neg = sample_balanced(labels, 256, 0.5)
    assert (len(pos), len(neg)) == (100, 156)  # only 100 positives exist: 256 - 100 negatives
    _check(labels, pos, neg)


def test_sample_balanced_few_positives_negatives_fill():
    torch.manual_seed(0)
    labels = _labels(10, 1000, 50)
    pos, neg = sample_balanced(labels, 256, 0.5)
    assert (len(pos), len(neg)) == (10, 246)  # all 10 positives, 256 - 10 negatives
    _check(labels, pos, neg)


def test_sample_balanced_quarter_fraction_and_few_negatives():
    torch.manual_seed(0)
    labels = _labels(300, 1000, 0)
    pos, neg = sample_balanced(labels, 512, 0.25)
    assert (len(pos), len(neg)) == (128, 384)
    labels = _labels(5, 20, 100)
    pos, neg = sample_balanced(labels, 256, 0.5)
    assert (len(pos), len(neg)) == (5, 20)  # everything usable, nothing ignored
    _check(labels, pos, neg)
    pos, neg = sample_balanced(torch.full((30,), -1), 256, 0.5)
    assert len(pos) == 0 and len(neg) == 0


def test_sample_balanced_is_random_subset():
    labels = _labels(300, 1000, 0)
    torch.manual_seed(1)
    a = sample_balanced(labels, 256, 0.5)[0]
    torch.manual_seed(2)
    b = sample_balanced(labels, 256, 0.5)[0]
    assert set(a.tolist()) != set(b.tolist())


# ---- crowd regions ------------------------------------------------------------------------------

RPN_MATCHER = Matcher(0.7, 0.3, allow_low_quality_matches=True)


def test_all_crowd_gt_gives_no_positives_and_ignores_inside():
    gt = torch.tensor([[0.0, 0, 100, 100]])
    boxes = torch.tensor(
        [
            [10.0, 10, 50, 50],  # inside the crowd: IoA 1600 / 1600 = 1 -> ignored
            [200.0, 200, 250, 250],  # far away: negative
            [80.0, 80, 130, 130],  # IoA 20*20 / 50*50 = 0.16 < 0.5 -> negative
            [60.0, 0, 120, 50],  # IoA 40*50 / 60*50 = 0.667 -> ignored
        ]
    )
    matches, labels = label_with_crowd(RPN_MATCHER, boxes, gt, torch.tensor([1]))
    assert matches.tolist() == [BACKGROUND] * 4
    assert labels.tolist() == [-1, 0, 0, -1]


def test_mixed_crowd_and_objects():
    gt = torch.tensor([[0.0, 0, 100, 100], [200.0, 200, 300, 300], [10.0, 10, 50, 50]])
    iscrowd = torch.tensor([1, 0, 0])
    boxes = torch.tensor(
        [
            [200.0, 200, 300, 300],  # exactly GT 1 -> positive, index 0 among the non-crowd GT
            [20.0, 60, 60, 90],  # inside the crowd, no object overlap -> ignored
            [400.0, 400, 450, 450],  # nothing -> negative
            [10.0, 10, 50, 50],  # an object inside the crowd region stays positive (index 1)
            [0.0, 0, 100, 100],  # the crowd box itself: IoU with GT 2 = 0.16 -> would be neg -> ignored
        ]
    )
    matches, labels = label_with_crowd(RPN_MATCHER, boxes, gt, iscrowd)
    assert labels.tolist() == [1, -1, 0, 1, -1]
    assert matches[0].item() == 0 and matches[3].item() == 1
    assert labels.dtype == torch.float32


def test_no_gt_at_all():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5.0, 5, 20, 20]])
    matches, labels = label_with_crowd(RPN_MATCHER, boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert matches.tolist() == [BACKGROUND, BACKGROUND] and labels.tolist() == [0, 0]


def test_gt_overlapping_nothing_restores_no_low_quality_match():
    # One GT with IoU 0 against all three predictions: nothing may become its match.
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    assert matcher(torch.zeros(1, 3)).tolist() == [BACKGROUND] * 3


@pytest.mark.parametrize("low_quality", [True, False])
def test_matching_boxes_in_blocks_equals_the_whole_matrix(low_quality):
    """Dense scenes match block by block; every match (ties and low-quality ones too) is the whole matrix's."""
    from maskrcnn.structures import pairwise_iou

    gen = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 60, (300, 2), generator=gen).float()
    anchors = torch.cat([xy, xy + torch.randint(2, 12, (300, 2), generator=gen)], dim=1)
    gt = torch.cat([anchors[::7][:30] + 0.5, torch.tensor([[200.0, 200, 210, 210]])])  # one overlaps nothing
    anchors = torch.cat([anchors, anchors[:40]])  # repeated anchors: ties for a GT's best
    m = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    whole = m(pairwise_iou(gt, anchors))
    for block_elements in (1, 31 * 7, 31 * 64, 10**9):
        assert torch.equal(m.match_boxes(gt, anchors, block_elements), whole)
    assert torch.equal(m.match_boxes(gt[:0], anchors, 5), torch.full((340,), BACKGROUND))
    assert m.match_boxes(gt, anchors[:0], 5).shape == (0,)


def test_crowd_coverage_in_blocks():
    from maskrcnn.modeling.rpn import crowd_coverage
    from maskrcnn.structures import pairwise_ioa

    crowd = torch.tensor([[0.0, 0, 20, 20], [10, 10, 40, 30]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [15, 15, 35, 25], [50, 50, 60, 60], [5, 5, 25, 25], [38, 0, 42, 40]])
    expected = pairwise_ioa(crowd, boxes).max(dim=0).values
    for block_elements in (1, 4, 100):
        assert torch.equal(crowd_coverage(crowd, boxes, block_elements), expected)
    assert crowd_coverage(crowd, boxes[:0]).shape == (0,)
