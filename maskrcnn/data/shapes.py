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
exact geometry in every style.

`style="blobs"` is microscopy-like instead: 512-px grey images of 20 to 45 nuclei-like ellipses each,
soft-edged (their intensity falls off smoothly across the boundary) and faintly textured, on a dark,
uneven, noisy background. A blob's mask is its half-intensity contour, the ellipse itself, so where a
mask ends is decided by faint pixels: a stand-in for microscopy sets on which masks lag boxes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from maskrcnn.errors import UserError
from maskrcnn.fileio import atomic_write_text
from maskrcnn.rle import encode_mask, rle_area_and_box

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
BLOB_CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
SQUARE, CIRCLE, TRIANGLE = 1, 2, 3
RING, CROSS, STAR = 1, 2, 3
NUCLEUS = 1
RING_THICKNESS = (0.15, 0.30)  # of the outer radius
CROSS_ARM_WIDTH = (0.15, 0.25)  # of the cross's size
STAR_INNER_RADIUS = 0.4  # of the outer radius: long, sharp points
MIN_STROKE = 2.0  # pixels; a thinner ring or arm can fall between pixel centres and break apart
MIN_VISIBLE_FRACTION = 0.3  # an occluded shape keeps at least this share of its own area
MIN_VISIBLE_PIXELS = 40  # and at least this many pixels
PLACEMENT_TRIES = 10
# The blobs style's look, as (low, high) ranges drawn per image or per blob; intensities are grey levels.
BLOB_ASPECT = (0.5, 1.0)  # minor / major axis
BLOB_EDGE_WIDTH = (1.5, 3.0)  # pixels: the scale of the logistic fall-off across the ellipse
BLOB_BRIGHTNESS = (90.0, 220.0)  # a blob body's grey level
BLOB_TEXTURE = 0.1  # internal texture, relative to the blob's brightness (standard deviation)
BLOB_TEXTURE_CELL = 4  # pixels: the texture's grain
BACKGROUND_LEVEL = (15.0, 35.0)  # the dark background's mean grey level
BACKGROUND_VARIATION = 5.0  # standard deviation of the background's smooth unevenness
BACKGROUND_CELL = 128  # pixels: the unevenness varies over about this distance
PIXEL_NOISE = (8.0, 15.0)  # standard deviation of the per-pixel Gaussian noise

# A list of (category id, visible bool mask) pairs, one per shape, bottom first.
Shapes = list[tuple[int, np.ndarray]]


def make_shapes(
    out_dir: str | os.PathLike,
    num_train: int = 500,
    num_val: int = 100,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    max_shapes: int | None = None,
    shape_size: tuple[int, int] | None = None,
    style: str = "basic",
    num_test: int = 0,
) -> dict[str, tuple[Path, Path]]:
    """Write train/val (and test) images and COCO JSON under `out_dir`; return {split: (json file, image dir)}.

    `image_size` is a fixed side for square images, or a (min, max) range drawn per side; `shape_size`
    the (smallest, largest) shape in pixels (for blobs, the major axis). Left out, they and `max_shapes`
    are the style's: sides 160..256, up to 4 shapes, sizes 12..80 (basic) or 10..48 (fine); blobs: side
    512, 20 to 45 blobs (fewer if some find no room; at most `max_shapes` if that is under 20), sizes 14..40.
    """
    spec = _style(style)
    image_size = spec.image_size if image_size is None else image_size
    max_shapes = spec.max_shapes if max_shapes is None else max_shapes
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
    """Return the COCO categories a style writes (ids from 1), e.g. for a model's class names."""
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
    rle = encode_mask(mask)
    area, box = rle_area_and_box(rle)
    return {
        "category_id": category_id,
        "segmentation": rle,
        "bbox": box,
        "area": float(area),
        "iscrowd": 0,
        **extra,
    }


def render_image(
    rng: np.random.Generator, h: int, w: int, max_shapes: int = 4, shape_size: tuple[int, int] | None = None,
    style: str = "basic",
) -> tuple[np.ndarray, Shapes]:
    """Return an HxWx3 uint8 image and its shapes as (category id, visible bool mask) pairs."""
    spec = _style(style)
    shape_size = spec.shape_size if shape_size is None else shape_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    # Shapes must fit well inside the image, whatever its size.
    largest = min(float(shape_size[1]), min(h, w) / 1.6)
    smallest = min(float(shape_size[0]), largest)
    place = partial(_place_shapes, rng, style, xx, yy, max_shapes, smallest, largest)
    render = _render_blobs if spec.soft_edged else _render_flat
    return render(rng, xx, yy, place)


@dataclass(frozen=True)
class _Placed:
    """A shape just placed: its category, its full bool mask and the geometry it was drawn from."""

    category_id: int
    mask: np.ndarray
    cx: float
    cy: float
    size: float
    angle: float
    proportion: float


# paint(shape, shapes) draws a newly placed shape on the image; `shapes` are the earlier ones, still uncut.
Painter = Callable[[_Placed, Shapes], None]


def _render_flat(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, place: Callable[[Painter], Shapes],
) -> tuple[np.ndarray, Shapes]:
    """Paint shapes in flat random colours, lightly shaded, over a textured colour background."""
    image = _background(rng, xx, yy)
    colours: list[np.ndarray] = []

    def paint(shape: _Placed, shapes: Shapes) -> None:
        mask = shape.mask
        under = [colours[j] for j, (_, m) in enumerate(shapes) if (m & mask).any()]
        colour = _contrasting_colour(rng, [image[mask].mean(axis=0)] + under)
        shade = rng.normal(0.0, rng.uniform(2.0, 10.0), size=(int(mask.sum()), 3))
        image[mask] = colour + shade
        colours.append(colour)

    shapes = place(paint)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), shapes


def _render_blobs(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, place: Callable[[Painter], Shapes],
) -> tuple[np.ndarray, Shapes]:
    """Blend soft-edged, faintly textured bright blobs over a dark, uneven background; add pixel noise."""
    h, w = xx.shape
    image = rng.uniform(*BACKGROUND_LEVEL) + BACKGROUND_VARIATION * _smooth_noise(rng, h, w, BACKGROUND_CELL)
    texture = 1.0 + BLOB_TEXTURE * _smooth_noise(rng, h, w, BLOB_TEXTURE_CELL)
    noise = rng.uniform(*PIXEL_NOISE)

    def paint(shape: _Placed, shapes: Shapes) -> None:
        opacity = _blob_opacity(xx - shape.cx, yy - shape.cy, shape.size / 2.0, shape.angle, shape.proportion,
                                rng.uniform(*BLOB_EDGE_WIDTH))
        # Blended, not pasted: a blob's fading edge lets what lies under it show through.
        image[:] += opacity * (rng.uniform(*BLOB_BRIGHTNESS) * texture - image)

    shapes = place(paint)
    image += rng.normal(0.0, noise, size=(h, w))  # camera noise, on blobs and background alike
    grey = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), shapes


def _place_shapes(
    rng: np.random.Generator,
    style: str,
    xx: np.ndarray,
    yy: np.ndarray,
    max_shapes: int,
    smallest: float,
    largest: float,
    paint: Painter,
) -> Shapes:
    """Place and paint the style's number of shapes (some may not fit), each over the earlier ones.

    Returns their visible masks: a new shape hides what lies under it.
    """
    fewest = min(_style(style).min_shapes, max_shapes)
    shapes: Shapes = []
    full_areas: list[int] = []
    for _ in range(int(rng.integers(fewest, max_shapes + 1))):
        placed = _place_shape(rng, style, xx, yy, smallest, largest, shapes, full_areas)
        if placed is None:
            continue
        paint(placed, shapes)
        shapes = [(cat, m & ~placed.mask) for cat, m in shapes]
        shapes.append((placed.category_id, placed.mask))
        full_areas.append(int(placed.mask.sum()))
    return shapes


def _place_shape(
    rng: np.random.Generator,
    style: str,
    xx: np.ndarray,
    yy: np.ndarray,
    smallest: float,
    largest: float,
    shapes: Shapes,
    full_areas: list[int],
) -> _Placed | None:
    """Return a shape that leaves every earlier shape visible enough, or None if none fits in a few tries."""
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
            return _Placed(category_id, mask, cx, cy, size, angle, proportion)
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


def _ellipse_axes(r: float, proportion: float) -> tuple[float, float]:
    """Return a blob ellipse's semi-axes: major `r`, minor a proportion of it within BLOB_ASPECT."""
    low, high = BLOB_ASPECT
    return r, r * (low + (high - low) * proportion)


def _ellipse_distance(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    """Return the signed distance in pixels to a blob's ellipse, negative inside.

    The first-order distance (rho - 1) / |grad rho|, with rho the normalised radius (1 on the curve):
    exact for a circle, and for an ellipse exact on the curve and close near it, where the soft edge is.
    """
    a, b = _ellipse_axes(r, proportion)
    u, v = _rotate(dx, dy, angle)
    rho = np.hypot(u / a, v / b)
    slope = np.hypot(u / (a * a), v / (b * b))  # rho * |grad rho|
    # rho / slope lies between b and a; both vanish at the centre, deep inside, where b will do
    return (rho - 1.0) * np.divide(rho, slope, out=np.full_like(rho, b), where=slope > 0)


def _ellipse(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float) -> np.ndarray:
    return _ellipse_distance(dx, dy, r, angle, proportion) <= 0.0


def _blob_opacity(
    dx: np.ndarray, dy: np.ndarray, r: float, angle: float, proportion: float, edge_width: float,
) -> np.ndarray:
    """Return a blob's opacity: a logistic of its signed distance over `edge_width`, 0.5 on the ellipse.

    So its half-intensity contour is the ellipse, the blob's mask (`_ellipse`).
    """
    distance = _ellipse_distance(dx, dy, r, angle, proportion)
    return 0.5 - 0.5 * np.tanh(distance / (2.0 * edge_width))  # = 1 / (1 + exp(distance / width)), no overflow


@dataclass(frozen=True)
class _Style:
    """What a style draws: its categories, one mask function per category id, and default sizes."""

    categories: list[dict[str, Any]]
    masks: tuple[MaskFunction, ...]  # masks[category id - 1]
    shape_size: tuple[int, int]  # default (smallest, largest) shape size in pixels
    reach: float  # farthest shape pixel from the centre, in sizes, with slack: the margin to the image edge
    proportioned: bool  # its shapes take a random proportion (basic's have fixed proportions)
    description: str
    image_size: int | tuple[int, int] = (160, 256)  # default fixed side or (min, max) side range
    max_shapes: int = 4  # default most shapes per image
    min_shapes: int = 1  # fewest shapes an image tries to place (or max_shapes, if that is lower)
    soft_edged: bool = False  # grey blobs blended in with soft edges, not flat colours


_STYLES = {
    # reach 0.75: a rotated square's half-diagonal is 0.71 sizes
    "basic": _Style(CATEGORIES, (_square, _circle, _triangle), (12, 80), 0.75, False, "synthetic shapes"),
    # reach 0.55: a cross's arm corners lie at most 0.52 sizes out, rings and stars at 0.5
    "fine": _Style(FINE_CATEGORIES, (_ring, _cross, _star), (10, 48), 0.55, True, "synthetic fine-geometry shapes"),
    # reach 0.6: an ellipse reaches 0.5 sizes out; the slack keeps some of its soft edge in the image
    "blobs": _Style(BLOB_CATEGORIES, (_ellipse,), (14, 40), 0.6, True, "synthetic soft-edged blobs (nucleus-like)",
                    image_size=512, max_shapes=45, min_shapes=20, soft_edged=True),
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


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Return an HxW field of noise that varies smoothly over about `cell` pixels, of standard deviation <= 1.

    Standard normal values on a grid `cell` pixels apart, interpolated with a smoothstep (no creases).
    """
    grid = rng.normal(size=(h // cell + 2, w // cell + 2))

    def weights(n: int) -> tuple[np.ndarray, np.ndarray]:
        position = (np.arange(n) + 0.5) / cell
        index = position.astype(int)
        t = position - index
        return index, t * t * (3.0 - 2.0 * t)

    (iy, ty), (ix, tx) = weights(h), weights(w)
    rows = grid[iy] * (1.0 - ty)[:, None] + grid[iy + 1] * ty[:, None]
    return rows[:, ix] * (1.0 - tx) + rows[:, ix + 1] * tx


def _contrasting_colour(rng: np.random.Generator, avoid: list[np.ndarray], candidates: int = 8) -> np.ndarray:
    """Return the random RGB colour, of a few candidates, farthest from every colour in `avoid`."""
    options = rng.uniform(0, 255, size=(candidates, 3))
    distance = np.linalg.norm(options[:, None, :] - np.asarray(avoid)[None, :, :], axis=2).min(axis=1)
    return options[int(distance.argmax())]
