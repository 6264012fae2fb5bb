"""The training augmentation pipeline built from `input.*`: which transforms run, with what random draws.

Every draw comes from torch's global generator, which the train loader seeds per item from
(solver.seed, iteration, position in the batch) (see `maskrcnn.data.loader`): the same seed and
iteration give the same augmented sample, also after a resume and whatever `data.num_workers` is.
A transform that is off draws nothing, so turning one on never changes what the others draw (and
with only `input.horizontal_flip` set, the draws are exactly those of the flip-only loader before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from maskrcnn.data.transforms import color_jitter, crop, hflip, rot90, vflip

MAX_CROP_TRIES = 10  # windows drawn before an image whose objects all fall outside is left uncropped


@dataclass
class CropSpec:
    """A random crop: `size` is [h, w] in pixels (absolute) or [lo, hi] fractions of each side (relative_range)."""

    type: str = "absolute"  # absolute | relative_range
    size: Sequence[float] = (512, 512)
    min_visible_area_px: float = 0.0
    min_visible_fraction: float = 0.0


@dataclass
class Augmenter:
    """Random training augmentation of an (image [3,H,W] 0..1, target) pair; all parts off by default.

    Order: crop, horizontal flip, vertical flip, quarter turns, colour (geometry first, so a crop's
    window is drawn on the image as stored).
    """

    horizontal_flip: float = 0.0  # probabilities
    vertical_flip: float = 0.0
    rotate90: float = 0.0  # when it fires, 90, 180 or 270 degrees with equal chance
    crop: CropSpec | None = None
    brightness: float = 0.0  # factor drawn uniformly in [1 - b, 1 + b], as torchvision's ColorJitter
    contrast: float = 0.0
    saturation: float = 0.0
    flip_map: list[int] | None = field(default=None)  # keypoint mirror partners; see keypoint_flip_map

    @classmethod
    def from_config(cls, input_cfg: Any, flip_map: Sequence[int] | None = None) -> "Augmenter":
        """Return the pipeline that `cfg.input` (an InputConfig) describes."""
        c = input_cfg.crop
        spec = CropSpec(c.type, list(c.size), c.min_visible_area_px, c.min_visible_fraction) if c.enabled else None
        j = input_cfg.color_jitter
        return cls(input_cfg.horizontal_flip, input_cfg.vertical_flip, input_cfg.rotate90, spec,
                   j.brightness, j.contrast, j.saturation, list(flip_map) if flip_map is not None else None)

    @property
    def active(self) -> bool:
        """True when any part can change a sample."""
        return bool(self.horizontal_flip > 0 or self.vertical_flip > 0 or self.rotate90 > 0 or self.crop
                    or self.brightness > 0 or self.contrast > 0 or self.saturation > 0)

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return the augmented image and a new target (the input target is left as it was)."""
        if self.crop is not None:
            image, target = self._random_crop(image, target, self.crop)
        if self.horizontal_flip > 0 and _chance(self.horizontal_flip):
            image, target = hflip(image, target, self.flip_map)
        if self.vertical_flip > 0 and _chance(self.vertical_flip):
            image, target = vflip(image, target, self.flip_map)
        if self.rotate90 > 0 and _chance(self.rotate90):
            image, target = rot90(image, target, int(torch.randint(1, 4, ()).item()))
        if self.brightness > 0 or self.contrast > 0 or self.saturation > 0:
            image = color_jitter(image, _factor(self.brightness), _factor(self.contrast), _factor(self.saturation))
        return image, target

    @staticmethod
    def _random_crop(image: torch.Tensor, target: dict[str, Any],
                     spec: CropSpec) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return a random window of the image that keeps at least one object, if one of a few draws does."""
        h, w = image.shape[-2:]
        had_objects = bool((target.get("iscrowd", torch.zeros(len(target["boxes"]))) == 0).any())
        for _ in range(MAX_CROP_TRIES):
            ch, cw = _crop_size(spec, h, w)
            top = int(torch.randint(0, h - ch + 1, ()).item())
            left = int(torch.randint(0, w - cw + 1, ()).item())
            out = crop(image, target, top, left, ch, cw, spec.min_visible_area_px, spec.min_visible_fraction)
            # A window with no object left teaches nothing but background: draw another.
            if not had_objects or bool((out[1]["iscrowd"] == 0).any()):
                return out
        return image, target


def _chance(p: float) -> bool:
    """Return True with probability p (one draw; the same draw the flip-only loader made)."""
    return torch.rand(()).item() < p


def _factor(spread: float) -> float:
    """Return a factor uniform in [1 - spread, 1 + spread] (1 without a draw when spread is 0)."""
    if spread <= 0:
        return 1.0
    return float(torch.empty(()).uniform_(1.0 - spread, 1.0 + spread).item())


def _crop_size(spec: CropSpec, h: int, w: int) -> tuple[int, int]:
    """Return the (height, width) of the next window, never larger than the image."""
    if spec.type == "relative_range":
        lo, hi = float(spec.size[0]), float(spec.size[1])
        fh, fw = (float(v) for v in torch.empty(2).uniform_(lo, hi))
        return max(1, min(h, round(h * fh))), max(1, min(w, round(w * fw)))
    return min(h, int(spec.size[0])), min(w, int(spec.size[1]))
