"""The keypoint branch of Keypoint R-CNN (Mask R-CNN paper, §5): one m×m heat-map per keypoint.

Each keypoint is a one-hot m×m mask: the training target is the single cell that holds the keypoint
(visible ones only), the loss a cross-entropy over the m² positions (a softmax per keypoint, not a
per-pixel sigmoid). The head: RoIAlign 14×14 → 8 × (3×3 conv 512 + ReLU) → 4×4 deconvolution,
stride 2 (28×28) → bilinear ×2 (56×56). At test time each heat-map is resized (bicubic) to its box's
size in pixels and the arg-max cell's centre is the keypoint: the sub-pixel refinement torchvision and
Detectron2 use, computed here for all boxes at once. The keypoint's score is its logit (torchvision)
or, as Detectron2 reports it, that cell's softmax normalised over the m×m heat-map (`score`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.modeling.backbone import ConvNorm, norm_factory

# Bicubic convolution coefficient, as PyTorch's (and OpenCV's) bicubic interpolation uses.
CUBIC_A = -0.75
# Upper bound on the resized heat-map values held at once while decoding (floats): boxes go in chunks.
DECODE_CHUNK_ELEMENTS = 1 << 24


class KeypointHead(nn.Module):
    """3×3 convs with ReLU, a 2× deconvolution to K channels, then bilinear 2× upsampling."""

    def __init__(self, in_channels: int, num_keypoints: int, num_convs: int = 8, conv_dim: int = 512,
                 norm: str = ""):
        super().__init__()
        make_norm = norm_factory(norm)
        self.convs = nn.Sequential(
            *(ConvNorm(in_channels if i == 0 else conv_dim, conv_dim, 3, make_norm) for i in range(num_convs))
        )
        self.deconv = nn.ConvTranspose2d(conv_dim if num_convs else in_channels, num_keypoints, 4, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return [R, K, 4S, 4S] heat-map logits for [R, C, S, S] pooled features."""
        x = self.deconv(self.convs(x))
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def keypoint_targets(keypoints: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Return (flat heat-map index [P, K], valid [P, K] bool) of each RoI's matched GT keypoints.

    `keypoints` [P, K, 3] (x, y, visibility) in the same pixels as `boxes` [P, 4]. A keypoint is a
    target when it is labelled (visibility > 0) and falls inside its RoI; the cell is
    ⌊(x - x1) · m / w⌋ (a keypoint on the right or bottom edge goes to the last cell).
    """
    x1, y1, x2, y2 = (boxes[:, i : i + 1] for i in range(4))
    x, y = keypoints[..., 0], keypoints[..., 1]
    col = ((x - x1) * (size / (x2 - x1))).floor().long()
    row = ((y - y1) * (size / (y2 - y1))).floor().long()
    col = torch.where(x == x2, size - 1, col)
    row = torch.where(y == y2, size - 1, row)
    valid = (col >= 0) & (row >= 0) & (col < size) & (row < size) & (keypoints[..., 2] > 0)
    index = torch.where(valid, row * size + col, torch.zeros_like(col))
    return index, valid


def keypoint_loss(logits: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """Return the mean cross-entropy over the m² positions of every valid (RoI, keypoint) heat-map."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    flat = logits.flatten(2)[valid]  # [V, m²]
    return F.cross_entropy(flat.float(), index[valid])


def _cubic_weights(t: Tensor) -> Tensor:
    """Return the 4 bicubic tap weights [..., 4] for fractional offsets `t` [...] (taps at -1, 0, 1, 2)."""
    a = CUBIC_A

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def bicubic_taps(out_sizes: Tensor, in_size: int, max_out: int) -> tuple[Tensor, Tensor]:
    """Return (source indices, weights), both [N, max_out, 4], resizing in_size samples to out_sizes[i].

    The sampling of `F.interpolate(mode="bicubic", align_corners=False)`: source position
    (j + 0.5) · in/out - 0.5, four taps clamped at the borders. Positions past a map's own size repeat
    its last one, so a padded map never holds a value its real part lacks.
    """
    scale = in_size / out_sizes.float()[:, None]  # [N, 1]
    dst = torch.arange(max_out, device=out_sizes.device)[None].minimum(out_sizes[:, None] - 1).float()
    src = scale * (dst + 0.5) - 0.5
    base = src.floor()
    taps = (base.long()[..., None] + torch.arange(-1, 3, device=out_sizes.device)).clamp(0, in_size - 1)
    return taps, _cubic_weights(src - base)


def bicubic_matrix(out_sizes: Tensor, in_size: int, max_out: int) -> Tensor:
    """Return [N, max_out, in_size] matrices: M[i] @ v is v resized bicubically to max_out samples,
    of which the first out_sizes[i] are map i's own (the rest repeat its last one)."""
    taps, weights = bicubic_taps(out_sizes, in_size, max_out)
    matrix = torch.zeros(len(out_sizes), max_out, in_size, device=out_sizes.device)
    return matrix.scatter_add_(2, taps, weights)


def resize_bicubic(maps: Tensor, out_h: Tensor, out_w: Tensor) -> Tensor:
    """Return [N, K, H, W] (H, W the largest sizes): maps [N, K, m, m] each resized to (out_h[i], out_w[i]).

    As two matrix products (rows, then columns): dense 4-tap matrices multiply faster on the CPU than
    gathers do. Map i fills its top-left out_h[i] × out_w[i] block; the rest repeats its last row and column.
    """
    m = maps.shape[-1]
    rows = bicubic_matrix(out_h, m, int(out_h.max()))[:, None]  # [N, 1, H, m]
    cols = bicubic_matrix(out_w, m, int(out_w.max()))[:, None]  # [N, 1, W, m]
    with torch.autocast(maps.device.type, enabled=False):  # float32 even under autocast: arg-max ties otherwise
        return rows @ (maps.float() @ cols.transpose(-1, -2))


def heatmaps_to_keypoints(maps: Tensor, boxes: Tensor, score: str = "logit") -> tuple[Tensor, Tensor]:
    """Return keypoints [R, K, 3] (x, y, 1) in the boxes' pixels and their scores [R, K].

    Each heat-map is resized bicubically to ⌈box width⌉ × ⌈box height⌉ cells (boxes of at least
    one pixel); the arg-max cell's centre, scaled back to the box, is the keypoint (torchvision's and
    Detectron2's rule). Scores: `logit`, the resized map's maximum; `detectron2`, exp(maximum) over
    the sum of exp(logits) of the m×m map (a softmax made comparable across box sizes, above 1 where
    the bicubic resize overshoots).
    """
    if score not in ("logit", "detectron2"):
        raise ValueError(f"keypoint score must be 'logit' or 'detectron2', got {score!r}")
    maps = maps.float()
    boxes = boxes.float()
    num, k, size = maps.shape[0], maps.shape[1], maps.shape[-1]
    keypoints = maps.new_zeros((num, k, 3))
    scores = maps.new_zeros((num, k))
    if num == 0:
        return keypoints, scores
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    out_w, out_h = widths.ceil().long(), heights.ceil().long()
    # Boxes in chunks of similar size (less padding), each chunk's resized maps bounded in size.
    order = (out_h * out_w).argsort()
    heights_list, widths_list = out_h[order].tolist(), out_w[order].tolist()
    start = 0
    while start < num:
        stop, h_max, w_max = start + 1, heights_list[start], widths_list[start]
        while stop < num:
            h_next, w_next = max(h_max, heights_list[stop]), max(w_max, widths_list[stop])
            if (stop + 1 - start) * k * h_next * w_next > DECODE_CHUNK_ELEMENTS:
                break
            stop, h_max, w_max = stop + 1, h_next, w_next
        rows = order[start:stop]
        resized = resize_bicubic(maps[rows], out_h[rows], out_w[rows]).flatten(2)
        # The first arg-max lies in a map's own block: the padding only repeats values seen before it.
        best, pos = resized.max(dim=2)  # [n, K]
        x_int, y_int = pos % w_max, pos // w_max
        keypoints[rows, :, 0] = (x_int.float() + 0.5) * (widths[rows] / out_w[rows])[:, None]
        keypoints[rows, :, 1] = (y_int.float() + 0.5) * (heights[rows] / out_h[rows])[:, None]
        if score == "detectron2":  # exp(best - best) / sum(exp(map - best)), shifted by best for range
            best = 1.0 / (maps[rows].flatten(2) - best[..., None]).exp().sum(dim=2)
        scores[rows] = best
        start = stop
    keypoints[..., 0] += boxes[:, 0:1]
    keypoints[..., 1] += boxes[:, 1:2]
    keypoints[..., 2] = 1
    return keypoints, scores


def flip_keypoints(keypoints: Tensor, width: float, flip_map: list[int]) -> Tensor:
    """Return keypoints [N, K, 3] mirrored left-right in an image `width` wide, left/right joints swapped.

    `flip_map[k]` is the index of keypoint k's mirror partner (k itself for a central keypoint).
    """
    out = keypoints[:, flip_map].clone()
    out[..., 0] = width - out[..., 0]
    return out
