"""Do two sets of detections agree? Used by the parity tests and the torchvision comparison benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Tolerances:
    """How close "the same detections" must be: boxes in pixels, scores absolute, masks by IoU."""

    box: float = 0.01
    score: float = 1e-4
    mask_iou: float = 0.99


def binary_masks(masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Return N×H×W booleans from boolean masks or from torchvision's N×1×H×W probabilities."""
    if masks.dtype == torch.bool:
        return masks
    return (masks[:, 0] if masks.dim() == 4 else masks) > threshold


def mask_ious(a: Tensor, b: Tensor) -> Tensor:
    """IoU of corresponding boolean masks (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def agreeing_pairs(expected: dict[str, Tensor], actual: dict[str, Tensor], tol: Tolerances) -> tuple[Tensor, Tensor]:
    """Return which (expected, actual) pairs agree within `tol` (same class, score, box, mask), an n×m boolean,
    and the pairs' largest box coordinate difference (n×m). Masks are compared when both sides have them."""
    if ("masks" in expected) != ("masks" in actual):
        raise ValueError("masks on one side only: compare detections that both have masks, or neither")
    box_diff = (expected["boxes"].float()[:, None] - actual["boxes"].float()[None]).abs().amax(-1)
    agree = (
        (expected["labels"][:, None] == actual["labels"][None])
        & ((expected["scores"].float()[:, None] - actual["scores"].float()[None]).abs() <= tol.score)
        & (box_diff <= tol.box)
    )
    if "masks" in expected:
        expected_masks, actual_masks = binary_masks(expected["masks"]), binary_masks(actual["masks"])
        for i, j in agree.nonzero().tolist():
            agree[i, j] = float(mask_ious(expected_masks[i : i + 1], actual_masks[j : j + 1])) >= tol.mask_iou
    return agree, box_diff


def match_detections(expected: dict[str, Tensor], actual: dict[str, Tensor], tol: Tolerances) -> Tensor:
    """Return, per expected detection, the index of an actual detection that agrees with it within
    `tol` (same class, score, box, mask), or -1 when none does; each actual one is used at most once.

    Pairing by position alone is not enough: detections whose scores tie to ~1e-7 come in either order,
    and a box at an NMS or top-k boundary can be kept by one run and not the other. The pairing pairs as
    many as can be (augmenting paths), trying nearer boxes first: taking each one's nearest partner in
    turn can leave a detection alone whose only partner another could have done without.
    """
    n, m = len(expected["boxes"]), len(actual["boxes"])
    agree, box_diff = agreeing_pairs(expected, actual, tol)
    candidates = [sorted(agree[i].nonzero().flatten().tolist(), key=lambda j: float(box_diff[i, j])) for i in range(n)]
    owner = [-1] * m  # per actual detection, its expected partner

    def pair(i: int, tried: set[int]) -> bool:
        """Give expected detection i a partner, moving earlier pairs along if need be."""
        for j in candidates[i]:
            if j not in tried:
                tried.add(j)
                if owner[j] < 0 or pair(owner[j], tried):
                    owner[j] = i
                    return True
        return False

    for i in range(n):
        pair(i, set())
    partner = torch.full((n,), -1, dtype=torch.long)
    for j, i in enumerate(owner):
        if i >= 0:
            partner[i] = j
    return partner


def detection_differences(
    expected: dict[str, Tensor], actual: dict[str, Tensor], tol: Tolerances = Tolerances(),
    min_matched: float = 1.0,
) -> list[str]:
    """Return what differs beyond `tol` between two images' detections ([] when they agree).

    `min_matched` is the share of detections (of the larger list) that must find a partner: 1.0 means
    every one; a little less lets a near-tie at an NMS or score boundary go either way.
    """
    n_expected, n_actual = len(expected["boxes"]), len(actual["boxes"])
    if n_expected == n_actual == 0:
        return []
    partner = match_detections(expected, actual, tol)
    matched = int((partner >= 0).sum())
    if matched >= min_matched * max(n_expected, n_actual):
        return []
    first = int((partner < 0).nonzero()[0]) if matched < n_expected else None
    problems = [f"{matched} of {n_expected} expected detections have a partner among {n_actual} "
                f"(same class, box within {tol.box} px, score within {tol.score}, mask IoU >= {tol.mask_iou})"]
    if first is not None:
        problems.append(f"e.g. expected #{first}: class {int(expected['labels'][first])}, "
                        f"score {float(expected['scores'][first]):.5f}, box {expected['boxes'][first].tolist()}")
    return problems


def agreement_summary(
    expected: dict[str, Tensor], actual: dict[str, Tensor], tol: Tolerances = Tolerances()
) -> dict[str, int]:
    """Count (not judge) how many detections agree within `tol`: for reports on reduced precision."""
    partner = match_detections(expected, actual, tol)
    return {"expected": len(expected["boxes"]), "actual": len(actual["boxes"]), "matched": int((partner >= 0).sum())}
