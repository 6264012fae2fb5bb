"""LabelMe: one JSON file per image, beside the image, with a list of labelled shapes.

Format (https://github.com/wkentaro/labelme, the JSON that `labelme` saves; its
examples/instance_segmentation shows the layout): `imagePath` (relative to the JSON file),
`imageWidth`, `imageHeight`, and `shapes`, each with `label`, `points` ([[x, y], ...]),
`shape_type` (polygon, rectangle: two corners, circle: centre and a point on it, mask: two corners
and a base64 PNG `mask` of that box; line, linestrip, point and points enclose nothing) and
`group_id`: shapes with the same label and group_id are one object, as labelme's own COCO export
treats them.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskrcnn.data.convert import geometry
from maskrcnn.data.convert.common import (
    BAD_COORDINATES, BAD_MASK, DEGENERATE_SHAPE, UNSUPPORTED_SHAPE, CocoBuilder, Options, box_polygon, find_image,
    load_json, patch_positions, points_array, read_class_file,
)
from maskrcnn.errors import UserError

logger = logging.getLogger("maskrcnn.data.convert")

POLYGON_TYPES = {"polygon", "oriented_rectangle", None}


def read(path: Path, options: Options) -> tuple[CocoBuilder, Path]:
    """Return the builder holding every LabelMe file under `path` (a folder or one .json) and the image folder."""
    if path.is_dir():
        files, root = sorted(path.rglob("*.json")), path
        if not files:
            raise UserError(f"no .json files under '{path}'; give the folder where LabelMe saved its JSON files")
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise UserError(f"LabelMe input '{path}' does not exist; give the folder of LabelMe .json files")
    image_dir = options.images or root
    closed = read_class_file(options.class_map).names() if options.class_map else None
    builder = CocoBuilder("labelme", path, single=options.class_name, closed=closed, rle=options.rle)
    read_any = False
    for f in files:
        data = load_json(f, "LabelMe file", "fix or remove it")
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            if len(files) == 1:
                raise UserError(f"'{f}' is not a LabelMe file (no 'shapes' list); give LabelMe's JSON files")
            logger.warning(f"{f}: skipped: not a LabelMe file (no 'shapes' list)")
            builder.warnings += 1
            continue
        read_any = True
        builder.begin(f)
        _read_file(builder, f, data, image_dir)
    builder.end()
    if not read_any:
        raise UserError(f"none of the .json files under '{path}' is a LabelMe file (no 'shapes' lists)")
    return builder, image_dir


def _read_file(builder: CocoBuilder, f: Path, data: dict[str, Any], image_dir: Path) -> None:
    """Add one LabelMe file's image and objects."""
    shapes = [s for s in data["shapes"] if isinstance(s, dict)]
    builder.seen(len(data["shapes"]))
    for _ in range(len(data["shapes"]) - len(shapes)):
        builder.skip(BAD_COORDINATES)
    image_path = data.get("imagePath")
    name = str(image_path) if image_path else f"{f.stem}.*"
    found = find_image(str(image_path), [f.parent, image_dir]) if image_path else None
    image = builder.image(found, image_dir, name, stated=(data.get("imageWidth"), data.get("imageHeight")),
                          objects=len(shapes))
    if image is None:
        return
    # Shapes sharing (label, group_id) form one object; ungrouped shapes are objects on their own.
    groups: dict[Any, list[dict[str, Any]]] = {}
    for k, shape in enumerate(shapes):
        gid = shape.get("group_id")
        groups.setdefault((str(shape.get("label")), gid) if gid is not None else k, []).append(shape)
    for group in groups.values():
        category = builder.category(group[0].get("label"), shapes=len(group))
        if category is None:
            continue
        parts: list[np.ndarray | str | None] = []
        masks: list[np.ndarray | str] = []
        for shape in group:
            kind = shape.get("shape_type")
            if kind == "mask":
                masks.append(_mask_positions(shape, image[1], image[2]))
            elif kind in POLYGON_TYPES or kind in ("rectangle", "circle"):
                parts.append(_polygon(shape))
            else:
                builder.skip(UNSUPPORTED_SHAPE, str(kind))
        if masks:  # a mask among the shapes: the object becomes one RLE, the union of all of them
            builder.union(image, category, parts, masks)
        elif parts:
            builder.polygons(image, category, parts)


def _polygon(shape: dict[str, Any]) -> np.ndarray | str | None:
    """Return the polygon of a polygon, rectangle or circle shape, or why there is none."""
    points = points_array(shape.get("points"))
    if points is None:
        return BAD_COORDINATES
    kind = shape.get("shape_type")
    if kind == "rectangle" and len(points) == 2:
        (x1, y1), (x2, y2) = points
        return box_polygon(x1, y1, x2, y2)
    if kind == "circle":
        if len(points) != 2:
            return BAD_COORDINATES
        (cx, cy), (px, py) = points
        r = float(np.hypot(px - cx, py - cy))
        return geometry.ellipse(cx, cy, r, r) if r > 0 else DEGENERATE_SHAPE
    return points  # polygon, oriented_rectangle (4 corners), a 4-point rectangle


def _mask_positions(shape: dict[str, Any], width: int, height: int) -> np.ndarray | str:
    """Return the image positions of a mask shape's pixels: its PNG placed at the first corner."""
    points = points_array(shape.get("points"))
    data = shape.get("mask")
    if points is None or len(points) != 2 or not isinstance(data, str):
        return BAD_MASK
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            patch = np.asarray(im.convert("L")) > 0
    except Exception:  # noqa: BLE001 - bad base64 or not a PNG: the shape cannot be used
        return BAD_MASK
    left, top = (int(round(float(v))) for v in points.min(axis=0))
    return patch_positions(patch, left, top, width, height)
