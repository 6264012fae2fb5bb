"""A synthetic COCO-format dataset of squares, circles and triangles: quick to make, hard enough to learn.

Each image has a textured background (a colour gradient, a low-frequency pattern and noise) and 1 to
`max_shapes` shapes with random colours, sizes and rotations. Later shapes occlude earlier ones; a
shape is only placed if every shape under it stays at least `MIN_VISIBLE_FRACTION` visible, so every
painted pixel of a shape belongs to exactly one annotation. Masks are stored as compressed RLE; bbox
and area come from the visible mask. Everything is a pure function of the seed.

`style="fine"` draws rings, crosses and stars instead, smaller by default: thin annuli and arms a few
pixels wide and sharp star points. On such geometry a pixel of misalignment costs much of a mask's IoU,
so RoIPool's quantised bins (against RoIAlign) show up in mask AP at IoU 0.75, as in the Mask R-CNN
paper's ablation; the basic shapes are too blunt for that. Masks are sampled at pixel centres from
exact geometry in both styles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.config import atomic_write_text
from maskrcnn.errors import UserError

CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
FINE_CATEGORIES = [
    {"id": 1, "name": "ring", "supercategory": "shape"},
    {"id": 2, "name": "cross", "supercategory": "shape"},
    {"id": 3, "name": "star", "supercategory": "shape"},
]
SQUARE, CIRCLE, TRIANGLE = 1, 2, 3
RING, CROSS, STAR = 1, 2, 3
RING_THICKNESS = (0.15, 0.30)  # of the outer radius
CROSS_ARM_WIDTH = (0.15, 0.25)  # of the cross's size
STAR_INNER_RADIUS = 0.4  # of the outer radius: long, sharp points
MIN_STROKE = 2.0  # pixels; a thinner ring or arm can fall between pixel centres and break apart
MIN_VISIBLE_FRACTION = 0.3  # an occluded shape keeps at least this share of its own area
MIN_VISIBLE_PIXELS = 40  # and at least this many pixels
PLACEMENT_TRIES = 10


def make_shapes(
    out_dir: str | os.PathLike,
    num_train: int = 500,
    num_val: int = 100,
    seed: int = 0,
    image_size: int | tuple[int, int] = (160, 256),
    max_shapes: int = 4,
    shape_size: tuple[int, int] | None = None,
    style: str = "basic",
    num_test: int = 0,
) -> dict[str, tuple[Path, Path]]:
    """Write train/val (and test) images and COCO JSON under `out_dir`; return {split: (json file, image dir)}.

    `image_size` is a fixed side for square images, or a (min, max) range drawn per side; `shape_size`
    the (smallest, largest) shape in pixels, by default the style's (basic 12..80, fine 10..48).
    """
    spec = _style(style)
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or sides[0] < 32 or sides[1] < sides[0]:
        raise UserError(f"image size {image_size!r} is invalid; use a side of at least 32 pixels (--size 32 or more) or a (min, max) range")
    if num_train < 0 or num_val < 0 or num_test < 0 or max_shapes < 1:
        raise UserError("make-shapes needs --train/--val/--test >= 0 and --max-shapes >= 1")

    def render(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        pixels, shapes = render_image(rng, h, w, max_shapes, shape_size, style)
        return pixels, [mask_annotation(mask, category_id) for category_id, mask in shapes]

    return write_dataset(out_dir, num_train, num_val, seed, sides, render, spec.categories, spec.description,
                         num_test=num_test)


def shape_categories(style: str = "basic") -> list[dict[str, Any]]:
    """Return the COCO categories a style writes (ids 1..3), e.g. for a model's class names."""
    return [dict(c) for c in _style(style).categories]


def write_dataset(
    out_dir: str | os.PathLike, num_train: int, num_val: int, seed: int, sides: tuple[int, int],
    render: Callable[[np.random.Generator, int, int], tuple[np.ndarray, list[dict[str, Any]]]],
    categories: list[dict[str, Any]], description: str, seed_key: tuple[int, ...] = (), num_test: int = 0,
) -> dict[str, tuple[Path, Path]]:
    """Render train/val (and test) images of random sizes in `sides` and write them with their COCO JSON.

    `render(rng, h, w)` returns the pixels and the image's annotations (without ids). One generator
    per image, seeded by (seed, split, index): a split's images do not depend on how many the other
    splits have, and the test split's stream is one that neither training nor validation ever draws.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory")
    result = {}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val), ("test", num_test))):
        if split == "test" and not count:
            continue
        image_dir = out / split
        try:
            image_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create '{image_dir}': {e.strerror}") from None
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, split_index, index, *seed_key])
            h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
            pixels, objects = render(rng, h, w)
            image_id = index + 1
            file_name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
        ann_file = out / f"{split}.json"
        data = {"info": {"description": f"{description}, seed {seed}"}, "images": images,
                "annotations": annotations, "categories": categories}
        atomic_write_text(ann_file, json.dumps(data, separators=(",", ":")))
        result[split] = (ann_file, image_dir)
    return result


def mask_annotation(mask: np.ndarray, category_id: int, **extra: Any) -> dict[str, Any]:
    """Return a COCO annotation (no ids) with a compressed-RLE mask, and bbox and area from that mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "category_id": category_id,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        **extra,
    }


def render_image(
    rng: np.random.Generator, h: int, w: int, max_shapes: int = 4, shape_size: tuple[int, int] | None = None,
    style: str = "basic",
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Return an HxWx3 uint8 image and its shapes as (category id, visible bool mask) pairs."""
    spec = _style(style)
    shape_size = spec.shape_size if shape_size is None else shape_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    image = _background(rng, xx, yy)
    shapes: list[tuple[int, np.ndarray]] = []
    full_areas: list[int] = []
    colours: list[np.ndarray] = []
    # Shapes must fit well inside the image, whatever its size.
    largest = min(float(shape_size[1]), min(h, w) / 1.6)
    smallest = min(float(shape_size[0]), largest)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        placed = _place_shape(rng, style, xx, yy, smallest, largest, shapes, full_areas)
        if placed is None:
            continue
        category_id, mask = placed
        under = [colours[j] for j, (_, m) in enumerate(shapes) if (m & mask).any()]
        colour = _contrasting_colour(rng, [image[mask].mean(axis=0)] + under)
        shade = rng.normal(0.0, rng.uniform(2.0, 10.0), size=(int(mask.sum()), 3))
        image[mask] = colour + shade
        for j, (cat, m) in enumerate(shapes):
            shapes[j] = (cat, m & ~mask)  # the new shape hides what lies under it
        shapes.append((category_id, mask))
        full_areas.append(int(mask.sum()))
        colours.append(colour)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), shapes


def _place_shape(
    rng: np.random.Generator,
    style: str,
    xx: np.ndarray,
    yy: np.ndarray,
    smallest: float,
    largest: float,
    shapes: list[tuple[int, np.ndarray]],
    full_areas: list[int],
) -> tuple[int, np.ndarray] | None:
    """Return (category id, mask) for a shape that leaves every earlier shape visible enough, or None."""
    spec = _style(style)
    h, w = xx.shape
    for _ in range(PLACEMENT_TRIES):
        category_id = int(rng.integers(1, len(spec.masks) + 1))
        size = float(rng.uniform(smallest, largest))
        margin = spec.reach * size
        cx = float(rng.uniform(margin, max(margin, w - margin)))
        cy = float(rng.uniform(margin, max(margin, h - margin)))
        angle = float(rng.uniform(0.0, 2.0 * np.pi))
        # Drawn only where the style's shapes use it, so basic datasets stay what they always were.
        proportion = float(rng.uniform()) if spec.proportioned else 0.0
        mask = _shape_mask(category_id, xx - cx, yy - cy, size, angle, style, proportion)
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        if all(
            (m & ~mask).sum() >= max(MIN_VISIBLE_FRACTION * full, MIN_VISIBLE_PIXELS)
            for (_, m), full in zip(shapes, full_areas)
        ):
            return category_id, mask
    return None


# A mask function maps pixel-centre offsets (dx, dy) from a shape's centre, its outer radius r (half its
# size), its rotation and a proportion in [0, 1) (a ring's thickness, a cross's arm width) to a bool mask.
MaskFunction = Callable[[np.ndarray, np.ndarray, float, float, float], np.ndarray]


def _rotate(dx: np.ndarray, dy: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the offsets in the shape's own frame, rotated by `angle`."""
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _square(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    u, v = _rotate(dx, dy, angle)
    return (np.abs(u) <= r) & (np.abs(v) <= r)


def _circle(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    return dx * dx + dy * dy <= r * r


def _triangle(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    # Equilateral triangle with circumradius r: within distance r/2 (its inradius) of the centre
    # along each edge's outward normal, which points between two vertices.
    u, v = _rotate(dx, dy, angle)
    inside = np.ones(dx.shape, dtype=bool)
    for k in range(3):
        t = np.pi / 2 + 2 * np.pi * k / 3 + np.pi / 3
        inside &= u * np.cos(t) + v * np.sin(t) <= r / 2
    return inside


def _ring(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    low, high = RING_THICKNESS
    inner = max(r - max((low + (high - low) * proportion) * r, MIN_STROKE), 0.0)
    d2 = dx * dx + dy * dy
    return (d2 <= r * r) & (d2 > inner * inner)


def _cross(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    low, high = CROSS_ARM_WIDTH
    half_arm = max((low + (high - low) * proportion) * 2.0 * r, MIN_STROKE) / 2.0
    u, v = np.abs(_rotate(dx, dy, angle))
    return ((u <= r) & (v <= half_arm)) | ((v <= r) & (u <= half_arm))


def _star(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    # Fold every point into the half-sector between a tip P = (r, 0) and the next inner corner Q at
    # angle pi/5; there the star is the triangle O-P-Q, i.e. the origin's side of the line PQ.
    u, v = _rotate(dx, dy, angle)
    sector = 2 * np.pi / 5
    phi = np.abs(np.mod(np.arctan2(v, u) + sector / 2, sector) - sector / 2)
    rho = np.hypot(u, v)
    qx, qy = STAR_INNER_RADIUS * r * np.cos(sector / 2), STAR_INNER_RADIUS * r * np.sin(sector / 2)
    # (qy, r - qx) is PQ's normal pointing away from the origin.
    return rho * (qy * np.cos(phi) + (r - qx) * np.sin(phi)) <= qy * r


@dataclass(frozen=True)
class _Style:
    """What a style draws: its categories, one mask function per category id, and default sizes."""

    categories: list[dict[str, Any]]
    masks: tuple[MaskFunction, ...]  # masks[category id - 1]
    shape_size: tuple[int, int]  # default (smallest, largest) shape size in pixels
    reach: float  # farthest shape pixel from the centre, in sizes, with slack: the margin to the image edge
    proportioned: bool  # its shapes take a random proportion (basic's have fixed proportions)
    description: str


_STYLES = {
    # reach 0.75: a rotated square's half-diagonal is 0.71 sizes
    "basic": _Style(CATEGORIES, (_square, _circle, _triangle), (12, 80), 0.75, False, "synthetic shapes"),
    # reach 0.55: a cross's arm corners lie at most 0.52 sizes out, rings and stars at 0.5
    "fine": _Style(FINE_CATEGORIES, (_ring, _cross, _star), (10, 48), 0.55, True, "synthetic fine-geometry shapes"),
}
STYLES = tuple(_STYLES)


def _style(style: str) -> _Style:
    """Return a style's description, or raise UserError for an unknown name."""
    if style not in _STYLES:
        raise UserError(f"unknown shapes style {style!r}; choose one of: {', '.join(STYLES)}")
    return _STYLES[style]


def _shape_mask(
    category_id: int, dx: np.ndarray, dy: np.ndarray, size: float, angle: float, style: str = "basic",
    proportion: float = 0.0,
) -> np.ndarray:
    """Return the bool mask of a shape of `size` rotated by `angle`, given pixel offsets from its centre."""
    return _style(style).masks[category_id - 1](dx, dy, size / 2.0, angle, proportion)


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Return a float HxWx3 background: a two-colour gradient, a soft wave pattern and pixel noise."""
    h, w = xx.shape
    start, end = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = start + (end - start) * t[..., None]
    freq = rng.uniform(0.02, 0.15, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wave = np.sin(freq[0] * xx + phase[0]) * np.sin(freq[1] * yy + phase[1])
    image += wave[..., None] * rng.uniform(-40, 40, size=3)
    image += rng.normal(0.0, rng.uniform(2.0, 12.0), size=(h, w, 3))
    return image


def _contrasting_colour(rng: np.random.Generator, avoid: list[np.ndarray], candidates: int = 8) -> np.ndarray:
    """Return the random RGB colour, of a few candidates, farthest from every colour in `avoid`."""
    options = rng.uniform(0, 255, size=(candidates, 3))
    distance = np.linalg.norm(options[:, None, :] - np.asarray(avoid)[None, :, :], axis=2).min(axis=1)
    return options[int(distance.argmax())]
