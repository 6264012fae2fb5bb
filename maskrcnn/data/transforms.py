"""Geometric augmentations applied to an (image, target) pair together."""

from __future__ import annotations

from typing import Any

import torch


def hflip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the image [C,H,W] and a copy of its target mirrored left-right (boxes and masks)."""
    width = image.shape[-1]
    out = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        # Boxes are continuous xyxy coordinates, so the mirror of [x1, x2] is [W - x2, W - x1].
        out["boxes"] = torch.stack(
            [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
        )
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    # Keypoints will need x -> W - x plus swapping left/right joint indices (a flip map).
    return image.flip(-1), out
