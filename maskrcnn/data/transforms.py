"""Augmentations applied to an (image, target) pair together: flips, quarter turns, crops, colour."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from maskrcnn.instance_masks import InstanceMasks, as_instance_masks


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
        out["masks"] = as_instance_masks(target["masks"]).hflip()
    if "keypoints" in target:
        keypoints = target["keypoints"]
        order = list(flip_map) if flip_map is not None else list(range(keypoints.shape[1]))
        keypoints = keypoints[:, order].clone()
        keypoints[..., 0] = torch.where(keypoints[..., 2] > 0, width - keypoints[..., 0], keypoints[..., 0])
        out["keypoints"] = keypoints
    return image.flip(-1), out


def vflip(image: torch.Tensor, target: dict[str, Any],
          flip_map: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the image [C,H,W] and a copy of its target mirrored top-bottom (boxes, masks, keypoints).

    A mirror is a mirror whichever way it faces: left and right keypoints trade names here too (a
    vertical flip equals a horizontal flip followed by a 180-degree rotation, which keeps the names).
    """
    height = image.shape[-2]
    out = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        out["boxes"] = torch.stack(
            [boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], dim=1
        )
    if "masks" in target:
        out["masks"] = as_instance_masks(target["masks"]).vflip()
    if "keypoints" in target:
        keypoints = target["keypoints"]
        order = list(flip_map) if flip_map is not None else list(range(keypoints.shape[1]))
        keypoints = keypoints[:, order].clone()
        keypoints[..., 1] = torch.where(keypoints[..., 2] > 0, height - keypoints[..., 1], keypoints[..., 1])
        out["keypoints"] = keypoints
    return image.flip(-2), out


def rot90(image: torch.Tensor, target: dict[str, Any], k: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the image [C,H,W] and a copy of its target rotated by k x 90 degrees counter-clockwise.

    A rotation is rigid, so keypoints keep their names. Pixel (row i, column j) of a W-wide image
    goes to (W - 1 - j, i); in continuous coordinates the point (x, y) goes to (y, W - x).
    """
    out = dict(target)
    for _ in range(k % 4):  # one quarter turn at a time: a single rule to get right
        width = image.shape[-1]
        if "boxes" in out:
            b = out["boxes"]
            out["boxes"] = torch.stack([b[:, 1], width - b[:, 2], b[:, 3], width - b[:, 0]], dim=1)
        if "masks" in out:
            out["masks"] = as_instance_masks(out["masks"]).rot90()
        if "keypoints" in out:
            kp = out["keypoints"].clone()
            x, y, labelled = kp[..., 0].clone(), kp[..., 1].clone(), kp[..., 2] > 0
            kp[..., 0] = torch.where(labelled, y, kp[..., 0])
            kp[..., 1] = torch.where(labelled, width - x, kp[..., 1])
            out["keypoints"] = kp
        image = torch.rot90(image, 1, dims=(-2, -1))
    return image, out


def mask_boxes(masks: InstanceMasks | torch.Tensor) -> torch.Tensor:
    """Return the tight xyxy boxes [N,4] (pixel edges) of masks (InstanceMasks or [N,H,W]); an empty mask gets a zero box."""
    return as_instance_masks(masks).boxes()


def crop(image: torch.Tensor, target: dict[str, Any], top: int, left: int, height: int, width: int,
         min_visible_area_px: float = 0.0, min_visible_fraction: float = 0.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the window [top:top+height, left:left+width] of the image and a copy of its target.

    Boxes are recomputed from the cropped masks (tight), so a cut object's box shrinks to what is
    left of it. Instances with nothing left are removed; those with fewer than `min_visible_area_px`
    pixels or less than `min_visible_fraction` of their pixels left become crowd regions (iscrowd=1):
    the model neither learns them as objects nor as background (see `label_with_crowd`). Keypoints
    outside the window become unlabelled (all zero).
    """
    out = dict(target)
    image = image[:, top: top + height, left: left + width]
    masks = as_instance_masks(target["masks"])
    before = masks.area()
    masks = masks.crop(top, left, height, width)
    after = masks.area()
    keep = after > 0
    cut = (after < min_visible_area_px) | (after < min_visible_fraction * before.clamp(min=1))
    for key in ("labels", "iscrowd", "area"):
        if isinstance(target.get(key), torch.Tensor) and len(target[key]) == len(before):
            out[key] = target[key][keep]
    out["masks"] = masks[keep]
    out["boxes"] = out["masks"].boxes()
    crowd = target.get("iscrowd", torch.zeros(len(before), dtype=torch.int64))
    out["iscrowd"] = (crowd.bool() | cut)[keep].to(crowd.dtype)
    if "keypoints" in target:
        kp = target["keypoints"][keep].clone()
        kp[..., 0] -= left
        kp[..., 1] -= top
        inside = (kp[..., 0] >= 0) & (kp[..., 0] < width) & (kp[..., 1] >= 0) & (kp[..., 1] < height)
        kp[~(inside & (kp[..., 2] > 0))] = 0.0  # the dataset's convention for an unlabelled keypoint
        out["keypoints"] = kp
    return image, out


def color_jitter(image: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0,
                 saturation: float = 1.0) -> torch.Tensor:
    """Return the RGB image [3,H,W] (0..1) with brightness, contrast and saturation scaled by the factors.

    Each factor blends with a reference (black, the mean grey level, the pixel's own grey), as
    torchvision's ColorJitter does; 1 leaves the image unchanged. Results are clamped to 0..1.
    """
    def grey(x: torch.Tensor) -> torch.Tensor:
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)  # ITU-R 601 luma

    if brightness != 1.0:
        image = (image * brightness).clamp(0.0, 1.0)
    if contrast != 1.0:
        image = (grey(image).mean() + contrast * (image - grey(image).mean())).clamp(0.0, 1.0)
    if saturation != 1.0:
        image = (grey(image) + saturation * (image - grey(image))).clamp(0.0, 1.0)
    return image
