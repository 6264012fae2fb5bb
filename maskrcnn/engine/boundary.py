"""Boundary IoU and boundary AP: how well masks follow the objects' outlines.

Boundary IoU (Cheng, Girshick, Dollár, Berg and Kirillov, "Boundary IoU: Improving Object-Centric
Image Segmentation Evaluation", CVPR 2021, https://arxiv.org/abs/2103.16562) compares only the
pixels near each mask's contour: a mask's boundary band is its pixels within distance d of a pixel
outside it (the outside of the image counts as outside, so a mask cut by the image border has a
boundary there too), and the boundary IoU of two masks is the IoU of their bands. d is 2 % of the
image diagonal, rounded, at least 1 pixel; distance is the chessboard distance (a band of d pixels
is what d erosions by a 3x3 square remove), as in the paper's reference implementation.

Mask IoU of a large object hardly notices a contour that is off by a pixel all round; boundary IoU
does. Boundary AP is COCO's AP with min(mask IoU, boundary IoU) as each detection's overlap with a
(non-crowd) ground-truth object, as the paper defines it; crowd regions keep mask IoU.

The band is computed within each mask's bounding box (the pixels just outside it are background),
by a separable sliding-window test for background (NumPy; no OpenCV or SciPy), from and to the RLE's pixel
positions, so its cost follows the objects' sizes, not the image's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

from maskrcnn.rle import rle_from_positions, rle_positions

# The band's width as a fraction of the image diagonal (the paper's default).
DILATION_RATIO = 0.02


def band_width(height: int, width: int, ratio: float = DILATION_RATIO) -> int:
    """Return the boundary band's width in pixels for an image of this size: ratio x diagonal, at least 1."""
    return max(1, int(round(ratio * math.hypot(height, width))))


def _crop_band(crop: np.ndarray, d: int) -> np.ndarray:
    """Return the band of a boolean mask crop whose outside (beyond its edges) is all background."""
    outside = np.pad(~crop, d, constant_values=True)  # beyond the box, or the image: background
    # Background within chessboard distance d: any over a (2d+1)-square window, one axis at a time.
    near = sliding_window_view(outside, 2 * d + 1, axis=0).any(axis=-1)
    near = sliding_window_view(near, 2 * d + 1, axis=1).any(axis=-1)
    return crop & near


def boundary_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Return the pixels of a boolean [H,W] mask within chessboard distance `d` of a pixel outside it."""
    mask = np.asarray(mask, dtype=bool)
    band = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size:
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        band[box] = _crop_band(mask[box], d)
    return band


def boundary_iou(a: np.ndarray, b: np.ndarray, ratio: float = DILATION_RATIO) -> float:
    """Return the boundary IoU of two boolean masks of the same [H,W] image (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different sizes: {a.shape} and {b.shape}")
    d = band_width(*a.shape, ratio=ratio)
    band_a, band_b = boundary_band(a, d), boundary_band(b, d)
    union = np.count_nonzero(band_a | band_b)
    return np.count_nonzero(band_a & band_b) / union if union else 1.0


def boundary_rle(rle: dict[str, Any], ratio: float = DILATION_RATIO) -> dict[str, Any]:
    """Return the COCO RLE (counts as text) of the boundary band of a compressed COCO RLE mask.

    Works from the mask's pixel positions within its box, never the whole image: an image holds
    hundreds of small nuclei, and decoding each to the full image cost more than scoring them.
    """
    height, width = rle["size"]
    positions = rle_positions(rle["counts"])
    if positions.size == 0:
        return rle_from_positions(positions, height, width)
    xs, ys = positions // height, positions % height
    x0, y0 = xs.min(), ys.min()
    crop = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
    crop[ys - y0, xs - x0] = True
    band_y, band_x = np.nonzero(_crop_band(crop, band_width(height, width, ratio)))
    return rle_from_positions(np.sort((band_x + x0) * height + band_y + y0), height, width)


class BoundaryCOCOeval(COCOeval):
    """COCOeval of masks whose overlap is min(mask IoU, boundary IoU) (boundary AP; crowd regions: mask IoU)."""

    def __init__(self, coco_gt: Any, coco_dt: Any, ratio: float = DILATION_RATIO) -> None:
        super().__init__(coco_gt, coco_dt, "segm")
        self.ratio = ratio

    def computeIoU(self, imgId: int, catId: int) -> Any:  # noqa: N802, N803 - pycocotools' names
        """Return the [D,G] overlaps of one image and category, in the order COCOeval.computeIoU uses."""
        mask_ious = super().computeIoU(imgId, catId)
        p = self.params
        cats = [catId] if p.useCats else p.catIds
        gt = [g for c in cats for g in self._gts[imgId, c]]
        dt = [d for c in cats for d in self._dts[imgId, c]]
        if not gt or not dt:
            return mask_ious
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][: p.maxDets[-1]]
        # Each annotation is in one (image, category) pair: its band is made once.
        bands_dt = [boundary_rle(d["segmentation"], self.ratio) for d in dt]
        bands_gt = [boundary_rle(g["segmentation"], self.ratio) for g in gt]
        band_ious = np.asarray(mask_util.iou(bands_dt, bands_gt, [int(g["iscrowd"]) for g in gt]))
        ious = np.array(mask_ious, dtype=np.float64)
        solid = np.array([not g["iscrowd"] for g in gt])
        ious[:, solid] = np.minimum(ious[:, solid], band_ious[:, solid])
        return ious
