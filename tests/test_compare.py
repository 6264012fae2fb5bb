"""The comparator under every parity test (`maskrcnn.engine.compare`): it passes the same detections and
fails a shifted box, a changed score or class, a lost mask and a dropped or extra detection; each detection
has at most one partner, and a pairing is found whenever one exists."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.engine.compare import Tolerances, detection_differences, mask_ious, match_detections

TOL = Tolerances(box=0.01, score=1e-4, mask_iou=0.99)
SIZE = 64  # the masks' image side


def detections(boxes: list[list[float]], scores: list[float] | None = None, labels: list[int] | None = None,
               masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One image's detections; each mask, unless given, fills its box (so masks differ where boxes do)."""
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes_t)
    if masks is None:
        masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes_t.round().long().tolist()):
            mask[y0:y1, x0:x1] = True
    scores = scores if scores is not None else [0.9 - 0.01 * i for i in range(n)]
    return {"boxes": boxes_t, "scores": torch.tensor(scores),
            "labels": torch.tensor(labels if labels is not None else [1] * n), "masks": masks}


def subset(dets: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The detections `keep` of `dets`, in that order."""
    return {key: value[keep] for key, value in dets.items()}


THREE = detections([[2, 2, 20, 20], [30, 4, 50, 30], [10, 35, 40, 60]])


def test_the_same_detections_in_any_order_agree():
    assert detection_differences(THREE, THREE, TOL) == []
    assert detection_differences(THREE, subset(THREE, [2, 0, 1]), TOL) == []
    assert match_detections(THREE, subset(THREE, [2, 0, 1]), TOL).tolist() == [1, 2, 0]
    assert detection_differences(subset(THREE, []), subset(THREE, []), TOL) == []  # nothing on either side


def test_a_box_shifted_beyond_the_tolerance_fails():
    shifted = {**THREE, "boxes": THREE["boxes"].clone()}
    shifted["boxes"][1, 0] += 0.5 * TOL.box
    assert detection_differences(THREE, shifted, TOL) == []
    shifted["boxes"][1, 0] += TOL.box
    problems = detection_differences(THREE, shifted, TOL)
    assert problems and problems[0].startswith("2 of 3 expected detections have a partner")
    assert "expected #1" in problems[1]


def test_a_changed_score_or_class_fails():
    for key, change in (("scores", 2 * TOL.score), ("labels", 1)):
        changed = {**THREE, key: THREE[key].clone()}
        changed[key][0] += change
        assert match_detections(THREE, changed, TOL).tolist() == [-1, 1, 2], key


def test_a_dropped_or_an_extra_detection_fails():
    assert detection_differences(THREE, subset(THREE, [0, 2]), TOL) != []
    assert detection_differences(subset(THREE, [0, 2]), THREE, TOL) != []  # an extra one in `actual`
    assert match_detections(subset(THREE, [0, 2]), THREE, TOL).tolist() == [0, 2]


def test_min_matched_lets_through_only_that_share():
    boxes = [[i % 10 * 6, i // 10 * 6, i % 10 * 6 + 5, i // 10 * 6 + 5] for i in range(100)]
    hundred = detections(boxes, scores=[0.5] * 100)
    assert detection_differences(hundred, subset(hundred, list(range(98))), TOL, min_matched=0.98) == []
    assert detection_differences(hundred, subset(hundred, list(range(97))), TOL, min_matched=0.98) != []


def test_a_lost_or_moved_mask_fails():
    lost = {**THREE, "masks": THREE["masks"].clone()}
    lost["masks"][1] = False  # the box stays, its mask is gone
    assert match_detections(THREE, lost, TOL).tolist() == [0, -1, 2]
    moved = {**THREE, "masks": THREE["masks"].roll(1, dims=2)}  # every mask one pixel to the right
    assert detection_differences(THREE, moved, TOL) != []


def test_empty_masks_do_not_stand_in_for_a_missing_detection():
    """Two empty masks agree (IoU 1), but they never pair detections whose boxes differ, nor make up for a
    detection that is missing."""
    empty = detections([[2, 2, 2.4, 20], [30, 4, 30.3, 30]], masks=torch.zeros(2, SIZE, SIZE, dtype=torch.bool))
    assert float(mask_ious(empty["masks"][:1], empty["masks"][1:])) == 1.0
    assert detection_differences(empty, empty, TOL) == []
    assert detection_differences(empty, subset(empty, [0]), TOL) != []
    assert match_detections(empty, subset(empty, [1]), TOL).tolist() == [-1, 0]
    one_box_twice = subset(empty, [0, 0])
    assert detection_differences(one_box_twice, subset(empty, [0, 1]), TOL) != []


def test_masks_on_one_side_only_are_an_error():
    without_masks = {key: value for key, value in THREE.items() if key != "masks"}
    for expected, actual in ((THREE, without_masks), (without_masks, THREE)):
        with pytest.raises(ValueError, match="masks on one side only"):
            detection_differences(expected, actual, TOL)
    assert detection_differences(without_masks, without_masks, TOL) == []  # a box-only model


def test_each_detection_has_at_most_one_partner():
    twice = subset(THREE, [0, 0, 1, 2])  # one detection given twice
    assert match_detections(twice, THREE, TOL).tolist() in ([0, -1, 1, 2], [-1, 0, 1, 2])
    assert detection_differences(twice, THREE, TOL) != []
    assert match_detections(THREE, twice, TOL).tolist()[1:] == [2, 3]
    assert detection_differences(THREE, twice, TOL) != []


def test_a_pairing_is_found_whenever_one_exists():
    """Expected #0 agrees with actual #0 (nearest) and #1; expected #1 only with actual #0. Pairing #0 with
    its nearest first leaves #1 alone; the comparator must find #0-#1, #1-#0."""
    expected = detections([[10, 10, 30, 30], [10, 10, 30.008, 30]], scores=[0.5, 0.5])
    actual = detections([[10, 10, 30.004, 30], [10, 10, 29.995, 30]], scores=[0.5, 0.5])
    assert match_detections(expected, actual, TOL).tolist() == [1, 0]
    assert detection_differences(expected, actual, TOL) == []
