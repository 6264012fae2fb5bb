"""Box geometry, the box coder, and mask pasting, all on xyxy boxes in absolute pixels."""

from __future__ import annotations

import math

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Largest log-scale change a regression may ask for: exp(4.135) = 1000/16, as in the paper's code.
BOX_SCALE_CLAMP = math.log(1000.0 / 16)


def box_area(boxes: Tensor) -> Tensor:
    """Return the area of each xyxy box."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """Return the [len(a), len(b)] matrix of intersection-over-union."""
    inter = _intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union


def pairwise_ioa(a: Tensor, b: Tensor) -> Tensor:
    """Return the [len(a), len(b)] matrix of intersection over the area of each box in `b`."""
    return _intersection(a, b) / box_area(b).clamp(min=1e-6)[None, :]


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Return boxes (any leading shape, last dim 4) clamped to the image rectangle."""
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def nonempty_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Return a bool mask of boxes whose width and height are both at least `min_size`."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return (w >= min_size) & (h >= min_size)


def scale_boxes(boxes: Tensor, scale_y: Tensor | float, scale_x: Tensor | float) -> Tensor:
    """Return boxes with x coordinates multiplied by `scale_x` and y by `scale_y`."""
    factors = torch.stack(
        [torch.as_tensor(scale_x), torch.as_tensor(scale_y)] * 2
    ).to(boxes)
    return boxes * factors


class BoxCoder:
    """Encodes a box relative to a reference box as (dx, dy, dw, dh) and back (R-CNN's parametrisation)."""

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = BOX_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """Return the [N,4] deltas that turn each reference box into its target box."""
        wx, wy, ww, wh = self.weights
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_x = references[:, 0] + 0.5 * ref_w
        ref_y = references[:, 1] + 0.5 * ref_h
        tgt_w = targets[:, 2] - targets[:, 0]
        tgt_h = targets[:, 3] - targets[:, 1]
        tgt_x = targets[:, 0] + 0.5 * tgt_w
        tgt_y = targets[:, 1] + 0.5 * tgt_h
        return torch.stack(
            (
                wx * (tgt_x - ref_x) / ref_w,
                wy * (tgt_y - ref_y) / ref_h,
                ww * torch.log(tgt_w / ref_w),
                wh * torch.log(tgt_h / ref_h),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """Return boxes [N, C, 4] from deltas [N, 4*C] applied to reference boxes [N, 4]."""
        references = references.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_x = references[:, 0] + 0.5 * ref_w
        ref_y = references[:, 1] + 0.5 * ref_h
        deltas = deltas.reshape(deltas.shape[0], -1, 4)
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        ctr_x = dx * ref_w[:, None] + ref_x[:, None]
        ctr_y = dy * ref_h[:, None] + ref_y[:, None]
        half_w = 0.5 * torch.exp(dw) * ref_w[:, None]
        half_h = 0.5 * torch.exp(dh) * ref_h[:, None]
        return torch.stack((ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h), dim=2)


def _bilinear_weights(pixels: Tensor, start: Tensor, length: Tensor, source_size: int) -> Tensor:
    """Return [D, P, source_size] weights resampling a source axis onto output `pixels` [D, P].

    Reproduces `F.interpolate(mode="bilinear", align_corners=False)` of a `source_size` axis to
    `length` pixels, placed at integer offset `start`; pixels outside that span get zero weight.
    """
    j = (pixels - start[:, None]).float()  # position inside the pasted span
    inside = ((j >= 0) & (j < length[:, None].float())).float()
    scale = source_size / length.float()
    src = ((j + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    low = src.floor().clamp(max=source_size - 1)
    frac = src - low
    low = low.long()
    high = (low + 1).clamp(max=source_size - 1)
    weights = torch.zeros(*pixels.shape, source_size, device=pixels.device)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights


def paste_masks(
    masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5,
    masks_per_batch: int = 16,
) -> Tensor:
    """Return bool [D, height, width]: each [M, M] mask probability map pasted into its box.

    The mask is padded by one pixel and its box grown to match (so the border is sampled, not
    clamped), the box is truncated to integer pixels, and the mask is bilinearly resized into it:
    the same result as torchvision's per-mask loop. Resizing is separable (window = Ry · mask · Rxᵀ),
    so masks are pasted in batches of two matrix products, each computed only over a window the
    size of the largest box in its batch (memory: masks_per_batch x window x 4 bytes at most).
    """
    num = masks.shape[0]
    out = torch.zeros(num, height, width, dtype=torch.bool, device=masks.device)
    if num == 0:
        return out
    m = masks.shape[-1]
    padded = F.pad(masks.reshape(num, m, m).float(), (1, 1, 1, 1))
    grow = (m + 2) / m
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * grow
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * grow
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    grown = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=1).long()
    box_w = (grown[:, 2] - grown[:, 0] + 1).clamp(min=1)
    box_h = (grown[:, 3] - grown[:, 1] + 1).clamp(min=1)
    # Each mask's window: the part of its box inside the image.
    y0, x0 = grown[:, 1].clamp(0, height), grown[:, 0].clamp(0, width)
    win_h = ((grown[:, 1] + box_h).clamp(max=height) - y0).clamp(min=0)
    win_w = ((grown[:, 0] + box_w).clamp(max=width) - x0).clamp(min=0)

    def sample(i: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        ry = _bilinear_weights(rows, grown[i, 1], box_h[i], m + 2)
        rx = _bilinear_weights(cols, grown[i, 0], box_w[i], m + 2)
        return torch.bmm(torch.bmm(ry, padded[i]), rx.transpose(1, 2)) > threshold

    _paste_in_windows(out, y0, x0, win_h, win_w, sample, masks_per_batch)
    return out


def _paste_in_windows(
    out: Tensor, y0: Tensor, x0: Tensor, win_h: Tensor, win_w: Tensor,
    sample: Callable[[Tensor, Tensor, Tensor], Tensor], masks_per_batch: int,
) -> None:
    """Fill `out` [D, H, W] window by window: `sample(indices, rows, cols)` gives a batch's bool windows.

    Masks of similar window size share a batch, so a batch's window fits all of its members tightly;
    rows and columns past the image are dropped when the windows are scattered into place.
    """
    height, width = out.shape[-2:]
    for i in torch.argsort(win_h * win_w).split(masks_per_batch):
        hb, wb = int(win_h[i].max()), int(win_w[i].max())
        if hb == 0 or wb == 0:
            continue  # boxes entirely outside the image paste nothing
        rows = y0[i, None] + torch.arange(hb, device=out.device)
        cols = x0[i, None] + torch.arange(wb, device=out.device)
        keep = sample(i, rows, cols) & (rows < height)[:, :, None] & (cols < width)[:, None, :]
        d, r, c = torch.nonzero(keep, as_tuple=True)
        out[i[d], rows[d, r], cols[d, c]] = True


def paste_masks_grid_sample(
    masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5, masks_per_batch: int = 16,
) -> Tensor:
    """Return bool [D, height, width]: each [M, M] mask bilinearly sampled at the pixel centres of its box.

    Detectron2's pasting: the box keeps its fractional coordinates, a pixel centre (x + 0.5) maps to
    ((x + 0.5 - x0) / (x1 - x0)) * 2 - 1 in grid_sample's coordinates (zero padding outside the mask),
    and a pixel is on at probability >= threshold. Masks are sampled in batches over windows the size
    of their boxes plus one pixel; beyond that margin the sampled value is always below 0.5.
    """
    num = masks.shape[0]
    out = torch.zeros(num, height, width, dtype=torch.bool, device=masks.device)
    if num == 0:
        return out
    m = masks.shape[-1]
    masks = masks.reshape(num, 1, m, m).float()
    boxes = boxes.float()
    x0 = (boxes[:, 0].floor() - 1).clamp(min=0).long()
    y0 = (boxes[:, 1].floor() - 1).clamp(min=0).long()
    win_w = ((boxes[:, 2].ceil() + 1).clamp(max=width).long() - x0).clamp(min=0)
    win_h = ((boxes[:, 3].ceil() + 1).clamp(max=height).long() - y0).clamp(min=0)

    def sample(i: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        b = boxes[i]
        gy = (rows.float() + 0.5 - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1
        gx = (cols.float() + 0.5 - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1
        hb, wb = rows.shape[1], cols.shape[1]
        grid = torch.stack([gx[:, None, :].expand(-1, hb, -1), gy[:, :, None].expand(-1, -1, wb)], dim=3)
        return F.grid_sample(masks[i], grid, align_corners=False)[:, 0] >= threshold

    _paste_in_windows(out, y0, x0, win_h, win_w, sample, masks_per_batch)
    return out


# ---- image-sized masks as RLE (tiled inference; the encoding is maskrcnn.rle) ----------------------


class RLEMasks:
    """Image-sized binary masks of D detections kept as COCO RLEs (counts as str), in detection order.

    What tiled inference returns in place of a bool [D, H, W] tensor, whose size grows with the image
    times the detections. `masks[i]` decodes one mask (bool H x W array); `masks[index]` with a slice,
    index list or bool tensor/array selects detections, as it would on a tensor; `numpy()` decodes all.
    """

    def __init__(self, rles: list[dict], height: int, width: int):
        self.rles = list(rles)
        self.height, self.width = int(height), int(width)

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, H, W), as the dense masks would have."""
        return len(self.rles), self.height, self.width

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            from maskrcnn.rle import decode_rle

            return decode_rle(self.rles[index])
        if isinstance(index, slice):
            return RLEMasks(self.rles[index], self.height, self.width)
        index = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return RLEMasks([self.rles[int(i)] for i in index], self.height, self.width)

    def numpy(self) -> np.ndarray:
        """Return all masks decoded, bool [D, H, W] (D x H x W bytes: for a few detections)."""
        out = np.zeros(self.shape, dtype=bool)
        for i in range(len(self)):
            out[i] = self[i]
        return out

    def __repr__(self) -> str:
        return f"RLEMasks({len(self)} masks of {self.height}x{self.width})"


def detections_to_cpu(output: dict[str, Any]) -> dict[str, Any]:
    """Return one image's detections with every tensor moved to the CPU (other values, e.g. RLEMasks, as they are)."""
    return {k: v.cpu() if hasattr(v, "cpu") else v for k, v in output.items()}
