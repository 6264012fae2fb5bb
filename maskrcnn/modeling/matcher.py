"""Matching predictions to ground truth by IoU, and balanced sampling of positives and negatives."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from maskrcnn.structures.boxes import pairwise_iou

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
        every_row = torch.arange(len(iou), device=iou.device)
        return self._match(len(iou), iou.shape[1], lambda start, stop: (every_row, iou[:, start:stop]),
                           [(0, iou.shape[1])], iou.device)

    def match_boxes(self, gt_boxes: Tensor, boxes: Tensor, block_elements: int = IOU_BLOCK_ELEMENTS) -> Tensor:
        """Return `self(pairwise_iou(gt_boxes, boxes))` without ever holding a large IoU matrix.

        A dense scene's matrix is large: 262 144 anchors of a 1024-px image against 5 000 objects would
        be 5 GB of float32 (and several such temporaries), nearly all zeros. Above `block_elements` IoUs,
        the boxes are grouped into square tiles of the image (by size: a tile is 4x its boxes' size) and
        taken a tile at a time (at most `block_elements` IoUs at once), each against only the GT boxes
        that reach into the rectangle the tile's boxes span: few, as objects are spread over the image.
        Every match is the one the whole matrix gives (the order of the columns changes no column's result).
        """
        if len(gt_boxes) * len(boxes) <= block_elements:
            return self(pairwise_iou(gt_boxes, boxes))
        order, tile_sizes = _tiles(boxes)
        boxes = boxes[order]
        block = max(1, block_elements // len(gt_boxes))
        spans, start = [], 0
        for size in tile_sizes:
            spans += [(s, min(s + block, start + size)) for s in range(start, start + size, block)]
            start += size

        def iou_block(start: int, stop: int) -> tuple[Tensor, Tensor]:
            cols = boxes[start:stop]
            (x1, y1), (x2, y2) = cols[:, :2].min(dim=0).values, cols[:, 2:].max(dim=0).values
            # A GT box outside the block's extent overlaps none of its boxes: its IoUs are all zero.
            near = (gt_boxes[:, 0] < x2) & (gt_boxes[:, 2] > x1) & (gt_boxes[:, 1] < y2) & (gt_boxes[:, 3] > y1)
            rows = torch.nonzero(near).squeeze(1)
            return rows, pairwise_iou(gt_boxes[rows], cols)

        matches = torch.empty(len(boxes), dtype=torch.int64, device=boxes.device)
        matches[order] = self._match(len(gt_boxes), len(boxes), iou_block, spans, boxes.device)
        return matches

    def _match(self, num_gt: int, num_preds: int, iou_block: Callable[[int, int], tuple[Tensor, Tensor]],
               spans: list[tuple[int, int]], device: torch.device) -> Tensor:
        """Match `num_preds` columns against `num_gt` rows, a block of columns (`spans`: start, stop) at a time.

        `iou_block(start, stop)` returns (rows, iou): the IoUs of columns start..stop-1 with those GT rows;
        rows left out have zero IoU with every column of the block. The spans cover the columns in order.
        """
        if num_gt == 0 or num_preds == 0:
            return torch.full((num_preds,), BACKGROUND, dtype=torch.int64, device=device)
        best_iou, matches = [], []
        row_best: Tensor | None = None  # each GT's best IoU over the blocks so far
        candidates = []  # (gt, prediction, iou) at each block's best per GT: the low-quality matches' candidates
        for start, stop in spans:
            rows, iou = iou_block(start, stop)
            if len(rows) == 0:  # no GT near: zero IoUs, and row 0 is what argmax picks among zeros
                best_iou.append(iou.new_zeros(iou.shape[1]))
                matches.append(torch.zeros(iou.shape[1], dtype=torch.int64, device=device))
                continue
            values, index = iou.max(dim=0)
            best_iou.append(values)
            index = rows[index]
            if len(rows) < num_gt:  # a column of zeros among these rows is one of zeros among all: row 0
                index = torch.where(values > 0, index, 0)
            matches.append(index)
            if self.allow_low_quality_matches:
                block_best = iou.max(dim=1).values
                if row_best is None:
                    row_best = iou.new_zeros(num_gt)
                row_best[rows] = torch.maximum(row_best[rows], block_best)
                gt, pred = torch.nonzero((iou == block_best[:, None]) & (iou > 0), as_tuple=True)
                candidates.append((rows[gt], pred + start, block_best[gt]))
        best_iou, matches = torch.cat(best_iou), torch.cat(matches)
        original = matches.clone()
        matches[best_iou < self.low] = BACKGROUND
        matches[(best_iou >= self.low) & (best_iou < self.high)] = IGNORE
        if candidates:
            # Each GT keeps the prediction(s) that overlap it best, even below the high threshold,
            # so that no object goes without a positive anchor.
            # A GT that overlaps nothing at all restores nothing (else every zero-IoU column would match).
            gt, pred, value = (torch.cat(parts) for parts in zip(*candidates))
            best_preds = pred[value == row_best[gt]]
            matches[best_preds] = original[best_preds]
        return matches


def _tiles(boxes: Tensor) -> tuple[Tensor, list[int]]:
    """Return an order of xyxy boxes that groups them by tile, and the number of boxes in each tile.

    A box's tile is a square of the image 4x its size class (a power of two) around its centre, so each
    tile holds boxes of one scale within a small patch of the image (anchors are stored row by row: a
    run of them spans a strip). Tiles are ordered by size class, then row, then column.
    """
    size = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    size_class = torch.log2(size + 1).floor().long().clamp(0, 20)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    offset = (centre - centre.min(dim=0).values).floor().long()
    tile = (offset >> (size_class + 2)[:, None]).clamp(max=2**20 - 1)
    key = (size_class << 40) | (tile[:, 1] << 20) | tile[:, 0]
    order = torch.argsort(key)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    return order, counts.tolist()


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
