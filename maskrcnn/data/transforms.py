"""Geometric augmentations applied to an (image, target) pair together."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def keypoint_flip_map(names: Sequence[str]) -> list[int]:
    """Return, per keypoint, the index of its mirror image: `left_x` <-> `right_x` (itself if unpaired).

    Names pair by a `left`/`right` word at the start or end, separated by `_`, `-` or a space
    (`left_eye`, `right-hand`, `Knee Left`), in any case.
    """
    def mirrored(name: str) -> str:
        for sep in ("_", "-", " "):
            words = name.lower().split(sep)
            for i in (0, -1):
                if len(words) > 1 and words[i] in ("left", "right"):
                    words[i] = "right" if words[i] == "left" else "left"
                    return sep.join(words)
        return name.lower()
    index = {name.lower(): i for i, name in enumerate(names)}
    return [index.get(mirrored(name), i) for i, name in enumerate(names)]


def hflip(image: torch.Tensor, target: dict[str, Any],
          flip_map: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the image [C,H,W] and a copy of its target mirrored left-right (boxes, masks, keypoints).

    Keypoints [N,K,3] move to x -> W - x and trade places with their mirror partners (`flip_map`,
    see `keypoint_flip_map`): a left wrist seen in a mirror is a right wrist.
    """
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
    if "keypoints" in target:
        keypoints = target["keypoints"]
        order = list(flip_map) if flip_map is not None else list(range(keypoints.shape[1]))
        keypoints = keypoints[:, order].clone()
        keypoints[..., 0] = torch.where(keypoints[..., 2] > 0, width - keypoints[..., 0], keypoints[..., 0])
        out["keypoints"] = keypoints
    return image.flip(-1), out
