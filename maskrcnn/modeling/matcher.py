"""Matching predictions to ground truth by IoU, and balanced sampling of positives and negatives."""

from __future__ import annotations

import torch
from torch import Tensor

BACKGROUND = -1  # best IoU below the low threshold
IGNORE = -2  # best IoU between the thresholds (or inside a crowd region)


class Matcher:
    """Assigns each prediction (column) the ground-truth row with the highest IoU, or a negative code."""

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool):
        if low > high:
            raise ValueError(f"matcher: low threshold {low} is above high threshold {high}")
        self.high = high
        self.low = low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """Return, for each column of `iou` [G, P], a GT index in 0..G-1 or BACKGROUND / IGNORE."""
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), BACKGROUND, dtype=torch.int64, device=iou.device)
        best_iou, matches = iou.max(dim=0)
        original = matches.clone()
        matches[best_iou < self.low] = BACKGROUND
        matches[(best_iou >= self.low) & (best_iou < self.high)] = IGNORE
        if self.allow_low_quality_matches:
            # Each GT keeps the prediction(s) that overlap it best, even below the high threshold,
            # so that no object goes without a positive anchor.
            # A GT that overlaps nothing at all restores nothing (else every zero-IoU column would match).
            best_per_gt = iou.max(dim=1).values
            _, best_preds = torch.nonzero((iou == best_per_gt[:, None]) & (iou > 0), as_tuple=True)
            matches[best_preds] = original[best_preds]
        return matches


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Return (positive, negative) index tensors: up to batch_size*fraction positives, negatives fill.

    `labels` is >= 1 for positives, 0 for negatives and -1 for ignored.
    """
    positive = torch.nonzero(labels >= 1).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    positive = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    negative = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    return positive, negative
