"""Tiled inference: run the model over overlapping windows of a large image and merge what they find.

Resizing a 2000-px image to a 128- or 800-px test size shrinks its objects below what the model was
trained on; tiling keeps them at the training scale instead. With `test.tiling.enabled` true (or auto
and the image larger than `threshold`), the image is cut into square windows of `tile_size` pixels,
neighbours sharing `overlap` of a window, each window run through the model as an image of its own
(so resized as usual), and the detections mapped back to image coordinates.

Merging. An object on a window border is found twice or more: cut in one window, whole (or cut
elsewhere) in its neighbour. The merge:

1. marks each detection whose box reaches an inner window border (a border that is not the image's
   edge) as *cut*: that window saw only part of the object;
2. ranks detections whole-first, then by score, and walks down that list keeping a detection unless
   an already kept detection of the same class, from another window, covers it: their masks (boxes
   for a box-only model) intersect by more than `merge_threshold` of the smaller one.

Why intersection over the smaller mask, not IoU: a cut piece lies inside the whole object, so its
IoU with the whole is only its share of it (a sliver cut off at a border scores ~0.1 and would
survive IoU-based NMS), while its intersection over the smaller mask is ~1. Two distinct objects
side by side barely intersect at all, whichever measure. Why whole-first, not score-first: the cut
piece may score higher than the whole, and keeping it would report the object's box and mask cut off.
Detections of one window are never merged with each other: the model's own NMS already decided
those, as it does without tiling. An object larger than the overlap band may be seen whole by no
window; its pieces are then kept unless they overlap enough (make `overlap` cover the largest objects).

Memory is bounded by the window, not the image: each window's masks are cropped to their extent
before the next window runs, and the kept ones become image-sized COCO RLEs (`RLEMasks`) at the end,
never a D x H x W array. At most `model.box_head.detections_per_image` detections are returned, the
highest-scoring, as without tiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskrcnn.config_schema import Config, TilingConfig
from maskrcnn.rle import rle_from_crop
from maskrcnn.structures.detections import RLEMasks

# A box within this many pixels of an inner window border counts as cut by it: a box regressed for an
# object that ends at the border lands on it only to within a pixel or two.
BORDER_MARGIN = 2.0

# Detections compared with all others of their class at a time when looking for duplicates.
PAIR_BLOCK = 256

Window = tuple[int, int, int, int]  # (y0, x0, y1, x1) in image pixels, end exclusive


def tile_size(tiling: TilingConfig, min_size_test: int) -> int:
    """Return the window side in image pixels (0 in the config: the model's test size)."""
    return tiling.tile_size or min_size_test


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Return the window starts along a side of `length` px: evenly spaced, neighbours sharing >= `overlap` x `tile`.

    The first window starts at 0, the last ends at `length`; a side no longer than a tile has one window.
    """
    if length <= tile:
        return [0]
    stride = max(1, tile - math.ceil(overlap * tile))
    count = math.ceil((length - tile) / stride) + 1
    # Evenly spread: every neighbour pair overlaps at least as much as asked (no thin last window).
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_windows(height: int, width: int, tile: int, overlap: float) -> list[Window]:
    """Return the windows (y0, x0, y1, x1) covering a `height` x `width` image, row by row."""
    return [(y0, x0, min(y0 + tile, height), min(x0 + tile, width))
            for y0 in window_starts(height, tile, overlap) for x0 in window_starts(width, tile, overlap)]


def should_tile(cfg: Config, height: int, width: int) -> bool:
    """Return whether `cfg.test.tiling` asks to tile a `height` x `width` image (more than one window)."""
    tiling = cfg.test.tiling
    tile = tile_size(tiling, cfg.input.min_size_test)
    if tiling.enabled == "false" or max(height, width) <= tile:
        return False
    return tiling.enabled == "true" or max(height, width) > (tiling.threshold or 2 * tile)


@dataclass
class Detections:
    """Detections of several windows in image coordinates, one row each, before merging.

    `masks` holds each detection's mask cropped to its extent, as (bool array, y0, x0) in image
    pixels (None for a box-only model); `cut` whether its box reaches an inner window border;
    `window` which window found it.
    """

    boxes: Tensor  # [N, 4] xyxy
    scores: Tensor  # [N]
    labels: Tensor  # [N]
    cut: Tensor  # [N] bool
    window: Tensor  # [N] long
    masks: list[tuple[np.ndarray, int, int]] | None = None
    keypoints: Tensor | None = None  # [N, K, 3]
    keypoint_scores: Tensor | None = None  # [N, K]

    def __len__(self) -> int:
        return len(self.scores)


def crop_masks(masks: Tensor, y0: int, x0: int) -> list[tuple[np.ndarray, int, int]]:
    """Return each bool mask of [D, h, w] cropped to the rows and columns it covers, with its image offset."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [D, h], [D, w]
    h, w = masks.shape[1:]
    top, left = rows.int().argmax(dim=1), cols.int().argmax(dim=1)
    bottom, right = h - rows.flip(1).int().argmax(dim=1), w - cols.flip(1).int().argmax(dim=1)
    empty = ~rows.any(dim=1)
    crops = []
    for i in range(masks.shape[0]):  # a ragged list: one slice per detection
        if empty[i]:
            crops.append((np.zeros((0, 0), dtype=bool), y0, x0))
            continue
        t, l, b, r = int(top[i]), int(left[i]), int(bottom[i]), int(right[i])
        crops.append((masks[i, t:b, l:r].cpu().numpy().copy(), y0 + t, x0 + l))
    return crops


def window_detections(output: dict[str, Tensor], window: Window, index: int, height: int, width: int) -> Detections:
    """Return one window's model output in image coordinates, each detection marked cut or not."""
    y0, x0, y1, x1 = window
    boxes = output["boxes"].detach().float().cpu() + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    # Only the borders inside the image cut objects; the image's own edge is where objects end anyway.
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + BORDER_MARGIN
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + BORDER_MARGIN
    if x1 < width:
        cut |= boxes[:, 2] >= x1 - BORDER_MARGIN
    if y1 < height:
        cut |= boxes[:, 3] >= y1 - BORDER_MARGIN
    masks = output.get("masks")
    keypoints = output.get("keypoints")
    if keypoints is not None:
        keypoints = keypoints.detach().float().cpu() + torch.tensor([x0, y0, 0.0])
    return Detections(
        boxes=boxes, scores=output["scores"].detach().float().cpu(), labels=output["labels"].detach().cpu(),
        cut=cut, window=torch.full((len(boxes),), index, dtype=torch.long),
        masks=crop_masks(masks.detach().bool(), y0, x0) if masks is not None else None,
        keypoints=keypoints,
        keypoint_scores=output["keypoint_scores"].detach().float().cpu() if keypoints is not None else None)


def concat_detections(parts: list[Detections]) -> Detections:
    """Return the detections of all windows as one set."""
    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    masks = None if parts[0].masks is None else [m for p in parts for m in p.masks]
    return Detections(cat("boxes"), cat("scores"), cat("labels"), cat("cut"), cat("window"), masks,
                      cat("keypoints"), cat("keypoint_scores"))


def _overlap_of_smaller(dets: Detections, i: int, j: int) -> float:
    """Return the intersection of detections i and j over the smaller one's area: masks, else boxes."""
    if dets.masks is None:
        a, b = dets.boxes[i], dets.boxes[j]
        w = (torch.min(a[2], b[2]) - torch.max(a[0], b[0])).clamp(min=0)
        h = (torch.min(a[3], b[3]) - torch.max(a[1], b[1])).clamp(min=0)
        smaller = min(float((a[2] - a[0]) * (a[3] - a[1])), float((b[2] - b[0]) * (b[3] - b[1])))
        return float(w * h) / smaller if smaller > 0 else 0.0
    (ma, ya, xa), (mb, yb, xb) = dets.masks[i], dets.masks[j]
    smaller = min(int(ma.sum()), int(mb.sum()))
    top, left = max(ya, yb), max(xa, xb)
    bottom, right = min(ya + ma.shape[0], yb + mb.shape[0]), min(xa + ma.shape[1], xb + mb.shape[1])
    if smaller == 0 or bottom <= top or right <= left:
        return 0.0
    inter = (ma[top - ya : bottom - ya, left - xa : right - xa] & mb[top - yb : bottom - yb, left - xb : right - xb]).sum()
    return float(inter) / smaller


def _candidate_pairs(dets: Detections, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return, per detection, the earlier-ranked ones that may duplicate it, as CSR arrays (offsets, partners).

    A candidate has the same class, comes from another window and has a box touching its box; only
    partners ranked earlier (`rank`, the merge's order) can be kept by the time a detection is looked
    at, so only those are listed. Compared PAIR_BLOCK detections at a time against the rest of their
    class, and stored as two int arrays: memory stays small with tens of thousands of detections.
    """
    rows, cols = [], []
    for label in dets.labels.unique():
        idx = torch.nonzero(dets.labels == label).flatten()
        boxes, window, order = dets.boxes[idx], dets.window[idx], torch.from_numpy(rank)[idx]
        for start in range(0, len(idx), PAIR_BLOCK):
            block = slice(start, start + PAIR_BLOCK)
            a = boxes[block]
            sides = torch.min(a[:, None, 2:], boxes[None, :, 2:]) - torch.max(a[:, None, :2], boxes[None, :, :2])
            candidate = (sides > 0).all(dim=2) & (window[block, None] != window[None, :])
            candidate &= order[None, :] < order[block, None]
            r, c = torch.nonzero(candidate, as_tuple=True)
            rows.append(idx[start + r].numpy().astype(np.int32))
            cols.append(idx[c].numpy().astype(np.int32))
    rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    cols_all = np.concatenate(cols) if cols else np.zeros(0, np.int32)
    by_row = np.argsort(rows_all, kind="stable")
    offsets = np.searchsorted(rows_all[by_row], np.arange(len(dets) + 1))
    return offsets, cols_all[by_row]


def merge_detections(dets: Detections, threshold: float) -> Tensor:
    """Return the indices of the detections to keep, by descending score (see the module docstring).

    A greedy walk, whole detections first (each by score), dropping one that a kept detection of the
    same class from another window covers by more than `threshold` of the smaller mask.
    """
    if len(dets) == 0:
        return torch.zeros(0, dtype=torch.long)
    # lexsort: the last key sorts first: whole (cut=False) before cut, then higher scores first.
    order = np.lexsort((-dets.scores.numpy(), dets.cut.numpy()))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    offsets, partners = _candidate_pairs(dets, rank)
    kept = np.zeros(len(dets), dtype=bool)
    # A loop over detections, once per image; only pairs from neighbouring windows are ever compared.
    for i in order.tolist():
        earlier = partners[offsets[i] : offsets[i + 1]]
        if not any(_overlap_of_smaller(dets, i, int(j)) > threshold for j in earlier[kept[earlier]]):
            kept[i] = True
    keep = torch.from_numpy(np.flatnonzero(kept))
    return keep[torch.argsort(dets.scores[keep], descending=True, stable=True)]


def _merged_output(dets: Detections, keep: Tensor, height: int, width: int) -> dict[str, Any]:
    """Return the kept detections as the model's output dict, masks as image-sized RLEs."""
    out: dict[str, Any] = {"boxes": dets.boxes[keep], "scores": dets.scores[keep], "labels": dets.labels[keep]}
    if dets.masks is not None:
        out["masks"] = RLEMasks([rle_from_crop(*dets.masks[i], height, width) for i in keep.tolist()], height, width)
    if dets.keypoints is not None:
        out["keypoints"] = dets.keypoints[keep]
        out["keypoint_scores"] = dets.keypoint_scores[keep]
    return out


def predict_tiled(model: Any, image: Tensor) -> dict[str, Any]:
    """Return one [3,H,W] image's detections found window by window and merged, in image coordinates.

    `model([window])` is the model's ordinary forward (a MaskRCNN or an exported model); masks come
    back as `RLEMasks`.
    """
    cfg = model.cfg
    tiling = cfg.test.tiling
    height, width = int(image.shape[-2]), int(image.shape[-1])
    windows = tile_windows(height, width, tile_size(tiling, cfg.input.min_size_test), tiling.overlap)
    parts = []
    for index, (y0, x0, y1, x1) in enumerate(windows):
        output = model([image[:, y0:y1, x0:x1]])[0]
        parts.append(window_detections(output, (y0, x0, y1, x1), index, height, width))
    dets = concat_detections(parts)
    keep = merge_detections(dets, tiling.merge_threshold)[: cfg.model.box_head.detections_per_image]
    return _merged_output(dets, keep, height, width)


def run_model(model: Any, images: list[Tensor]) -> list[dict[str, Any]]:
    """Return `model(images)`, except that the images `should_tile` picks are predicted window by window."""
    if getattr(model, "cfg", None) is None:  # not one of ours (e.g. a torchvision model): no tiling config
        return model(images)
    tiled = [should_tile(model.cfg, int(im.shape[-2]), int(im.shape[-1])) for im in images]
    whole = [im for im, t in zip(images, tiled) if not t]
    whole_outputs = iter(model(whole) if whole else [])
    return [predict_tiled(model, im) if t else next(whole_outputs) for im, t in zip(images, tiled)]
