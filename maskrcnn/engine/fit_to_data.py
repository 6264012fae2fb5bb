"""Fitting the recipe to the user's data (`data.fit_to_data`): scale, training window, anchors, counts.

A preset fits the data it was tuned on; real data sets differ in what matters most to Mask R-CNN: how large
the objects are in pixels, how many an image holds and how large the images are. From the training set's
annotations (boxes only, no image is read) this module chooses, as Detectron2's configs and Ultralytics'
autoanchor do by hand or by search:

- `input.scale`: one resize factor for every image, so that the median object is about
  TARGET_MEDIAN_OBJECT pixels: the mask head's 28x28 grid then resolves its boundary, and the anchors
  below cover it. One factor (not a fixed shorter side) keeps an object's size in pixels the same in a small
  image and in a large one, which is what microscopy, aerial and document images need;
- `input.crop`: training windows of TRAIN_WINDOW pixels after that scale, so a step costs the same
  whatever the image size, and up-scaled small objects do not make a step expensive;
- `model.anchors.sizes`: the smallest anchor at the 5th percentile of the scaled object sizes (a power of
  two, 8..32), doubling per FPN level;
- `model.box_head.detections_per_image` and the RPN's test-time proposal counts, from the most objects an
  image holds (COCO's 100 would cap the recall of a crowded image);
- `input.vertical_flip`, `input.rotate90` and colour jitter: on for small training sets (fewer than
  FEW_IMAGES images), where over-fitting dominates (DSB2018, 3 images, 30 minutes: the training loss fell to
  0.15 against 1.4 on all 460 images); real small sets are mostly seen from above (cells, tissue, fields,
  parts on a belt), so flips and quarter turns show them nothing false.

Every choice is logged with its reason; a key given as a KEY=VALUE override keeps the user's value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from maskrcnn.config_merge import merge_dict
from maskrcnn.config_schema import Config

log = logging.getLogger(__name__)

TARGET_MEDIAN_OBJECT = 40.0  # px after scaling
SCALE_RANGE = (0.25, 4.0)
TRAIN_WINDOW = 512  # px after scaling
SMALLEST_ANCHOR_RANGE = (8, 32)
FEW_IMAGES = 100
FEW_IMAGES_JITTER = 0.3  # colour jitter factor drawn in [1 - 0.3, 1 + 0.3] for small sets
LOG_PREFIX = "fitted to the data:"


@dataclass
class DataStatistics:
    """What the fit reads from a training set."""

    object_sizes: np.ndarray  # sqrt(w * h) of every non-crowd object, image pixels
    objects_per_image: np.ndarray  # int, per training image
    image_sides: np.ndarray  # [I, 2] (height, width)

    @classmethod
    def of(cls, dataset: Any) -> "DataStatistics":
        """Read the statistics of a CocoDataset (or a concatenation of them)."""
        boxes = dataset.object_boxes()
        wh = np.concatenate(boxes) if boxes else np.zeros((0, 2))
        return cls(object_sizes=np.sqrt(np.clip(wh[:, 0], 0, None) * np.clip(wh[:, 1], 0, None)),
                   objects_per_image=np.array([len(b) for b in boxes], dtype=np.int64),
                   image_sides=np.asarray(dataset.image_sizes, dtype=np.float64).reshape(-1, 2))

    def describe(self) -> str:
        """One line: images, objects, object size percentiles, objects per image, image sizes."""
        p5, p50, p95 = np.percentile(self.object_sizes, [5, 50, 95])
        lo, hi = self.image_sides.min(1), self.image_sides.max(1)
        return (f"{len(self.objects_per_image)} images, {len(self.object_sizes)} objects; object size "
                f"(sqrt of box area) 5/50/95th percentile {p5:.1f}/{p50:.1f}/{p95:.1f} px; objects an image: "
                f"median {np.median(self.objects_per_image):.0f}, most {self.objects_per_image.max()}; images "
                f"{lo.min():.0f} to {hi.max():.0f} px a side")


def nice_scale(raw: float) -> float:
    """Round a resize factor to quarter steps above 1 and two significant digits below, within SCALE_RANGE."""
    raw = min(max(raw, SCALE_RANGE[0]), SCALE_RANGE[1])
    return round(raw * 4) / 4 if raw >= 1 else float(f"{raw:.2g}")


def choose(stats: DataStatistics) -> dict[str, tuple[Any, str]]:
    """Return {config key: (value, reason)} for the training set `stats`."""
    p5, p50 = np.percentile(stats.object_sizes, [5, 50])
    scale = nice_scale(TARGET_MEDIAN_OBJECT / max(p50, 1e-6))
    chosen: dict[str, tuple[Any, str]] = {
        "input.scale": (scale, f"median object {p50:.1f} px -> {p50 * scale:.0f} px (aim: ~{TARGET_MEDIAN_OBJECT:.0f}, "
                               f"for the 28x28 mask grid and the anchors)")}

    smallest = 2 ** round(math.log2(max(p5 * scale, 1.0)))
    smallest = int(min(max(smallest, SMALLEST_ANCHOR_RANGE[0]), SMALLEST_ANCHOR_RANGE[1]))
    chosen["model.anchors.sizes"] = ([[smallest * 2**k] for k in range(5)],
                                     f"5th-percentile object {p5 * scale:.0f} px after scaling")

    window = int(math.ceil(TRAIN_WINDOW / scale))
    largest_side = float(stats.image_sides.max()) if len(stats.image_sides) else 0.0
    if largest_side * scale > TRAIN_WINDOW:
        chosen["input.crop.enabled"] = (True, f"images up to {largest_side * scale:.0f} px after scaling: train on "
                                              f"{TRAIN_WINDOW}-px windows ({window} px of the image)")
        chosen["input.crop.type"] = ("absolute", "")
        chosen["input.crop.size"] = ([float(window), float(window)], "")
        chosen["input.crop.min_visible_fraction"] = (0.5, "objects cut to under half are ignored, not background")
    chosen["input.max_size_train"] = (max(TRAIN_WINDOW, _round_up(min(largest_side, window) * scale, 32)), "")
    chosen["input.max_size_test"] = (max(1333, _round_up(largest_side * scale, 32)),
                                     "the largest training image, scaled, fits whole")

    most = int(stats.objects_per_image.max()) if len(stats.objects_per_image) else 0
    detections = max(100, _round_up(1.2 * most, 50))
    chosen["model.box_head.detections_per_image"] = (detections, f"up to {most} objects an image")
    post = max(1000, 2 * detections)
    chosen["model.rpn.post_nms_top_n_test"] = (post, "two proposals per detection kept")
    chosen["model.rpn.pre_nms_top_n_test"] = (max(1000, 2 * post), "")

    if len(stats.objects_per_image) < FEW_IMAGES:
        few = f"{len(stats.objects_per_image)} training images (< {FEW_IMAGES})"
        chosen["input.vertical_flip"] = (0.5, f"{few}; set input.vertical_flip=0 input.rotate90=0 for upright photos")
        chosen["input.rotate90"] = (0.5, "")
        for key in ("brightness", "contrast", "saturation"):
            chosen[f"input.color_jitter.{key}"] = (FEW_IMAGES_JITTER, "" if key != "brightness" else few)
    return chosen


def fit_to_data(cfg: Config, dataset: Any, keep: Iterable[str] = ()) -> list[str]:
    """Set the keys `choose` picks for `dataset` in `cfg` (except those in `keep`); return the log lines."""
    stats = DataStatistics.of(dataset)
    if not len(stats.object_sizes):
        return [f"{LOG_PREFIX} no objects to measure; the config is used as given"]
    keep = set(keep)
    lines = [f"{LOG_PREFIX} {stats.describe()}"]
    for key, (value, reason) in choose(stats).items():
        if key in keep or any(key.startswith(k + ".") for k in keep):
            lines.append(f"{LOG_PREFIX} {key} kept at {_get(cfg, key)!r} (given as an override)")
            continue
        merge_dict(cfg, _nested(key, value))  # the config's own typed merge, as a KEY=VALUE override
        lines.append(f"{LOG_PREFIX} {key}={value}" + (f"  ({reason})" if reason else ""))
    lines.append(f"{LOG_PREFIX} any of these can be set as KEY=VALUE; data.fit_to_data=false takes the config as given")
    for line in lines:
        log.info(line)
    return lines


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _nested(key: str, value: Any) -> dict[str, Any]:
    """`a.b.c`, v -> {"a": {"b": {"c": v}}}, the form `merge_dict` takes."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value
