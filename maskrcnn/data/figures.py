"""Synthetic stick figures with COCO's 17 person keypoints: a Keypoint R-CNN dataset made in seconds.

Each figure faces the viewer (its left side on the image's right, as a person facing the camera), with
a random size, torso tilt, arm and leg angles and bends; limbs are thick lines, the torso a
quadrilateral, the head a disc. Later figures may occlude earlier ones (each keeps at least
`MIN_VISIBLE_FRACTION` of its pixels); a keypoint under a later figure is labelled but not visible
(v = 1), one outside the image unlabelled (v = 0), the rest visible (v = 2). Annotations follow COCO's
person-keypoints format: integer-pixel `keypoints` triplets, `num_keypoints`, an RLE mask of the
visible figure, and a category with `keypoints` names and a 1-based `skeleton`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from maskrcnn.data.shapes import _background, _contrasting_colour, mask_annotation, write_dataset
from maskrcnn.errors import UserError

KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
            [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": KEYPOINT_NAMES,
               "skeleton": SKELETON}]
J = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
MIN_VISIBLE_FRACTION = 0.4
PLACEMENT_TRIES = 10


def make_figures(
    out_dir: str | os.PathLike,
    num_train: int = 500,
    num_val: int = 100,
    seed: int = 0,
    image_size: int | tuple[int, int] = (160, 256),
    max_figures: int = 3,
    num_test: int = 0,
) -> dict[str, tuple[Path, Path]]:
    """Write train/val (and test) images and COCO person-keypoints JSON under `out_dir`; return {split: (json, dir)}."""
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or sides[0] < 64 or sides[1] < sides[0]:
        raise UserError(f"image size {image_size!r} is invalid for figures; use a side of at least 64 pixels")
    if num_train < 0 or num_val < 0 or num_test < 0 or max_figures < 1:
        raise UserError("make-shapes --keypoints needs --train/--val/--test >= 0 and --max-shapes >= 1")

    def render(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[dict]]:
        pixels, figures = render_figures(rng, h, w, max_figures)
        return pixels, [_annotation(mask, keypoints) for mask, keypoints in figures]

    return write_dataset(out_dir, num_train, num_val, seed, sides, render, CATEGORIES,
                         "synthetic stick figures", seed_key=(7,), num_test=num_test)


def _annotation(mask: np.ndarray, keypoints: np.ndarray) -> dict:
    """Return a COCO person-keypoints annotation (integer-pixel keypoints, as COCO stores them)."""
    flat = []
    for x, y, v in keypoints.tolist():
        flat += [int(np.floor(x)), int(np.floor(y)), int(v)] if v > 0 else [0, 0, 0]
    return mask_annotation(mask, 1, keypoints=flat, num_keypoints=int((keypoints[:, 2] > 0).sum()))


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def figure_pose(rng: np.random.Generator, cx: float, cy: float, height: float) -> np.ndarray:
    """Return [17, 2] continuous keypoint positions of a random pose; (cx, cy) is the hips' midpoint."""
    tilt = rng.uniform(-0.4, 0.4)
    up = _rotate(np.array([0.0, -1.0]), tilt)
    side = _rotate(np.array([1.0, 0.0]), tilt)  # towards the figure's left (the viewer's right)
    hips = np.array([cx, cy])
    neck = hips + up * 0.32 * height
    head = neck + up * 0.11 * height
    p = np.zeros((17, 2))
    p[J["nose"]] = head - up * 0.02 * height
    for sign, which in ((1, "left"), (-1, "right")):
        p[J[f"{which}_eye"]] = head + side * sign * 0.03 * height + up * 0.015 * height
        p[J[f"{which}_ear"]] = head + side * sign * 0.065 * height
        shoulder = neck + side * sign * 0.13 * height
        hip = hips + side * sign * 0.085 * height
        p[J[f"{which}_shoulder"]], p[J[f"{which}_hip"]] = shoulder, hip
        # Angles from straight down, positive away from the body; the bend continues from the limb.
        arm = rng.uniform(-0.3, 2.6)
        down = -up
        elbow = shoulder + _rotate(down, -sign * arm) * 0.17 * height
        forearm = arm + rng.uniform(-1.8, 1.8)
        p[J[f"{which}_elbow"]] = elbow
        p[J[f"{which}_wrist"]] = elbow + _rotate(down, -sign * forearm) * 0.15 * height
        leg = rng.uniform(-0.15, 0.9)
        knee = hip + _rotate(down, -sign * leg) * 0.25 * height
        shin = leg + rng.uniform(-1.2, 0.3)
        p[J[f"{which}_knee"]] = knee
        p[J[f"{which}_ankle"]] = knee + _rotate(down, -sign * shin) * 0.24 * height
    return p


LIMBS = [("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("right_shoulder", "right_elbow"),
         ("right_elbow", "right_wrist"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
         ("right_hip", "right_knee"), ("right_knee", "right_ankle")]


def figure_mask(points: np.ndarray, height: float, h: int, w: int) -> np.ndarray:
    """Return the bool HxW mask of a figure drawn from its keypoints: limbs, torso and head."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(2, int(round(0.06 * height)))
    for a, b in LIMBS:
        pa, pb = points[J[a]], points[J[b]]
        draw.line([tuple(pa), tuple(pb)], fill=1, width=width)
        for q in (pa, pb):  # round joints
            draw.ellipse([q[0] - width / 2, q[1] - width / 2, q[0] + width / 2, q[1] + width / 2], fill=1)
    torso = [points[J["left_shoulder"]], points[J["right_shoulder"]], points[J["right_hip"]], points[J["left_hip"]]]
    draw.polygon([tuple(q) for q in torso], fill=1)
    neck = (points[J["left_shoulder"]] + points[J["right_shoulder"]]) / 2
    head = (points[J["left_ear"]] + points[J["right_ear"]]) / 2
    draw.line([tuple(neck), tuple(head)], fill=1, width=width)
    r = 0.075 * height
    draw.ellipse([head[0] - r, head[1] - r, head[0] + r, head[1] + r], fill=1)
    return np.asarray(canvas, dtype=bool)


def render_figures(
    rng: np.random.Generator, h: int, w: int, max_figures: int = 3
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Return an HxWx3 uint8 image and its figures as (visible bool mask, keypoints [17, 3]) pairs."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    image = _background(rng, xx, yy)
    masks: list[np.ndarray] = []
    points: list[np.ndarray] = []
    full_areas: list[int] = []
    for _ in range(int(rng.integers(1, max_figures + 1))):
        for _ in range(PLACEMENT_TRIES):
            height = float(rng.uniform(0.35, 0.9) * min(h, w))
            cx = float(rng.uniform(0.15 * height, w - 0.15 * height))
            cy = float(rng.uniform(0.45 * height, h - 0.35 * height))
            p = figure_pose(rng, cx, cy, height)
            mask = figure_mask(p, height, h, w)
            if mask.sum() < 60:
                continue
            if all((m & ~mask).sum() >= MIN_VISIBLE_FRACTION * full for m, full in zip(masks, full_areas)):
                break
        else:
            continue
        colour = _contrasting_colour(rng, [image[mask].mean(axis=0)])
        image[mask] = colour + rng.normal(0.0, rng.uniform(2.0, 8.0), size=(int(mask.sum()), 3))
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        points.append(p)
        full_areas.append(int(mask.sum()))
    figures = []
    for i, (mask, p) in enumerate(zip(masks, points)):
        inside = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
        visibility = np.where(inside, 2, 0)
        for later in masks[i + 1:]:  # hidden under a later figure: labelled, not visible
            cols = np.clip(p[:, 0].astype(int), 0, w - 1)
            rows = np.clip(p[:, 1].astype(int), 0, h - 1)
            visibility = np.where(inside & later[rows, cols], 1, visibility)
        figures.append((mask, np.concatenate([p, visibility[:, None]], axis=1)))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), figures
