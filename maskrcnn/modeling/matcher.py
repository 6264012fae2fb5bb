"""Matching predictions to ground truth by IoU, and balanced sampling of positives and negatives."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from maskrcnn.structures import pairwise_iou

BACKGROUND = -1  # best IoU below the low threshold
IGNORE = -2  # best IoU between the thresholds (or inside a crowd region)
# IoUs computed at once when matching boxes (float32: 16 MB), whatever the number of GT boxes.
IOU_BLOCK_ELEMENTS = 1 << 22


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
        return self._match(len(iou), iou.shape[1], lambda start, stop: iou[:, start:stop], max(1, iou.shape[1]),
                           iou.device)

    def match_boxes(self, gt_boxes: Tensor, boxes: Tensor, block_elements: int = IOU_BLOCK_ELEMENTS) -> Tensor:
        """Return `self(pairwise_iou(gt_boxes, boxes))`, computing the IoU matrix a block of columns at a time.

        A dense scene's matrix is large: 262 144 anchors of a 1024-px image against 5 000 objects would
        be 5 GB of float32 (and several such temporaries). Blocks of about `block_elements` IoUs keep it
        to tens of MB; every column's result, and every row's best, is the one the whole matrix gives.
        """
        block = max(1, block_elements // max(1, len(gt_boxes)))
        return self._match(len(gt_boxes), len(boxes), lambda start, stop: pairwise_iou(gt_boxes, boxes[start:stop]),
                           block, boxes.device)

    def _match(self, num_gt: int, num_preds: int, iou_block: Callable[[int, int], Tensor], block: int,
               device: torch.device) -> Tensor:
        """Match `num_preds` columns against `num_gt` rows, reading the IoU matrix from `iou_block(start, stop)`."""
        if num_gt == 0 or num_preds == 0:
            return torch.full((num_preds,), BACKGROUND, dtype=torch.int64, device=device)
        best_iou, matches = [], []
        row_best: Tensor | None = None  # each GT's best IoU over all blocks so far
        candidates = []  # (gt, prediction, iou) at each block's best per GT: the low-quality matches' candidates
        for start in range(0, num_preds, block):
            iou = iou_block(start, start + block)
            values, index = iou.max(dim=0)
            best_iou.append(values)
            matches.append(index)
            if self.allow_low_quality_matches:
                block_best = iou.max(dim=1).values
                row_best = block_best if row_best is None else torch.maximum(row_best, block_best)
                gt, pred = torch.nonzero((iou == block_best[:, None]) & (iou > 0), as_tuple=True)
                candidates.append((gt, pred + start, block_best[gt]))
        best_iou, matches = torch.cat(best_iou), torch.cat(matches)
        original = matches.clone()
        matches[best_iou < self.low] = BACKGROUND
        matches[(best_iou >= self.low) & (best_iou < self.high)] = IGNORE
        if self.allow_low_quality_matches:
            # Each GT keeps the prediction(s) that overlap it best, even below the high threshold,
            # so that no object goes without a positive anchor.
            # A GT that overlaps nothing at all restores nothing (else every zero-IoU column would match).
            gt, pred, value = (torch.cat(parts) for parts in zip(*candidates))
            best_preds = pred[value == row_best[gt]]
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
