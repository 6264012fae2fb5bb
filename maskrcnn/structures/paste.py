"""Mask pasting: the model's [M, M] mask probabilities into their boxes on the image, as bool [D, H, W] masks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


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
