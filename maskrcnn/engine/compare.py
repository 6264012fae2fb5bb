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


def match_detections(expected: dict[str, Tensor], actual: dict[str, Tensor], tol: Tolerances) -> Tensor:
    """Return, per expected detection, the index of an actual detection that agrees with it within
    `tol` (same class, score, box, mask), or -1 when none does; each actual one is used at most once.

    Pairing by position alone is not enough: detections whose scores tie to ~1e-7 come in either order,
    and a box at an NMS or top-k boundary can be kept by one run and not the other.
    """
    n, m = len(expected["boxes"]), len(actual["boxes"])
    partner = torch.full((n,), -1, dtype=torch.long)
    if n == 0 or m == 0:
        return partner
    box_diff = (expected["boxes"].float()[:, None] - actual["boxes"].float()[None]).abs().amax(-1)
    close = (
        (expected["labels"][:, None] == actual["labels"][None])
        & ((expected["scores"].float()[:, None] - actual["scores"].float()[None]).abs() <= tol.score)
        & (box_diff <= tol.box)
    )
    has_masks = "masks" in expected and "masks" in actual
    if has_masks:
        expected_masks, actual_masks = binary_masks(expected["masks"]), binary_masks(actual["masks"])
    used = torch.zeros(m, dtype=torch.bool)
    for i in range(n):
        for j in sorted(close[i].nonzero().flatten().tolist(), key=lambda j: float(box_diff[i, j])):
            if used[j]:
                continue
            if has_masks and float(mask_ious(expected_masks[i : i + 1], actual_masks[j : j + 1])) < tol.mask_iou:
                continue
            partner[i] = j
            used[j] = True
            break
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
