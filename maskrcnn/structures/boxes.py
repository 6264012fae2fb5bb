"""Box geometry and the box coder, on xyxy boxes in absolute pixels."""

from __future__ import annotations

import math

import torch
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
