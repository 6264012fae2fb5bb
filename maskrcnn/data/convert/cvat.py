"""CVAT for images 1.1: one XML file, an <image> element per image with its shapes.

Format: https://docs.cvat.ai/docs/manual/advanced/xml_format/ (version 1.1, "Annotation"):
`<image name width height>` holding `<box xtl ytl xbr ybr [rotation]>`, `<polygon points="x,y;x,y">`,
`<ellipse cx cy rx ry [rotation]>` and `<mask rle left top width height>`, each with `label` and an
optional `group_id` (CVAT's own COCO export makes one object of a group). A mask's `rle` is
comma-separated run lengths over its width x height box, row by row, starting with a background run.
Rotations are degrees clockwise. Polylines, points, skeletons and cuboids enclose no area; tags are
image labels, not objects. The labels declared in <meta> all become categories, used or not, so
splits exported separately get the same ids. CVAT for video (tracks) is refused.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from maskrcnn.data.convert.common import (
    BAD_COORDINATES, BAD_MASK, UNSUPPORTED_SHAPE, CocoBuilder, Options, box_polygon, ellipse_polygon, find_image,
    number, patch_positions, read_class_file,
)
from maskrcnn.errors import UserError

SHAPES = ("box", "polygon", "ellipse", "mask")
NO_AREA = ("polyline", "points", "skeleton", "cuboid")


def read(path: Path, options: Options) -> tuple[CocoBuilder, Path]:
    """Return the builder holding the CVAT XML file's images and objects, and the image folder."""
    if path.is_dir():
        xml_files = sorted(path.glob("*.xml"))
        if len(xml_files) != 1:
            raise UserError(f"'{path}' holds {len(xml_files)} .xml files; give CVAT's annotations.xml itself")
        path = xml_files[0]
    if not path.is_file():
        raise UserError(f"CVAT file '{path}' does not exist; give the annotations.xml of a 'CVAT for images 1.1' export")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"CVAT file '{path}' is not valid XML ({e}); export it again as 'CVAT for images 1.1'") from None
    except OSError as e:
        raise UserError(f"CVAT file '{path}' cannot be read: {e.strerror}") from None
    if root.tag != "annotations":
        raise UserError(f"'{path}' is not a CVAT XML file (its root is <{root.tag}>, not <annotations>)")
    images = root.findall("image")
    if not images and root.findall("track"):
        raise UserError(f"'{path}' is a 'CVAT for video' export (tracks); export the task as 'CVAT for images 1.1'")
    default_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_dir = options.images or default_dir
    closed = read_class_file(options.class_map).names() if options.class_map else None
    builder = CocoBuilder("cvat-xml", path, single=options.class_name, closed=closed, rle=options.rle)
    builder.declare(_declared_labels(root))
    builder.begin(path)
    for element in images:
        _read_image(builder, element, image_dir, path.parent)
    builder.end()
    return builder, image_dir


def _declared_labels(root: ET.Element) -> list[str]:
    """Return the names of the labels in <meta> that can mark areas (not skeleton parts or tags)."""
    names = []
    for label in root.iterfind("meta//labels/label"):
        kind = (label.findtext("type") or "any").strip()
        name = (label.findtext("name") or "").strip()
        if name and kind not in ("skeleton", "points", "polyline", "tag") and label.find("parent") is None:
            names.append(name)
    return names


def _read_image(builder: CocoBuilder, element: ET.Element, image_dir: Path, xml_dir: Path) -> None:
    """Add one <image> and its shapes."""
    shapes = [s for s in element if s.tag in SHAPES or s.tag in NO_AREA]
    builder.seen(len(shapes))
    name = element.get("name", "")
    found = find_image(name, [image_dir, xml_dir]) if name else None
    image = builder.image(found, image_dir, name or f"image id {element.get('id')}",
                          stated=(element.get("width"), element.get("height")), objects=len(shapes))
    if image is None:
        return
    groups: dict[object, list[ET.Element]] = {}
    for k, shape in enumerate(shapes):
        if shape.tag in NO_AREA:
            builder.skip(UNSUPPORTED_SHAPE, shape.tag)
            continue
        gid = shape.get("group_id")
        groups.setdefault((shape.get("label"), gid) if gid not in (None, "", "0") else k, []).append(shape)
    for group in groups.values():
        category = builder.category(group[0].get("label"), shapes=len(group))
        if category is None:
            continue
        masks = [_mask_positions(s, image[1], image[2]) for s in group if s.tag == "mask"]
        parts = [_polygon(s) for s in group if s.tag != "mask"]
        if masks:  # a mask in the group: the object becomes one RLE, the union of its shapes
            builder.union(image, category, parts, masks)
        else:
            builder.polygons(image, category, parts)


def _polygon(shape: ET.Element) -> np.ndarray | str | None:
    """Return the polygon of a box, polygon or ellipse element, or why there is none."""
    get = shape.get
    if shape.tag == "box":
        return box_polygon(get("xtl"), get("ytl"), get("xbr"), get("ybr"), get("rotation", 0))
    if shape.tag == "ellipse":
        rotation = number(get("rotation", 0))
        if rotation is None:
            return BAD_COORDINATES
        return ellipse_polygon(get("cx"), get("cy"), get("rx"), get("ry"), math.radians(rotation))
    try:
        pairs = [p.split(",") for p in (get("points") or "").strip().split(";") if p.strip()]
        points = np.array([[float(x), float(y)] for x, y in pairs], dtype=np.float64).reshape(-1, 2)
    except ValueError:
        return BAD_COORDINATES
    return points if np.isfinite(points).all() else BAD_COORDINATES


def _mask_positions(shape: ET.Element, width: int, height: int) -> np.ndarray | str:
    """Return the image positions of a <mask>'s pixels, decoded from its row-major runs in its box."""
    try:
        runs = np.array([int(v) for v in (shape.get("rle") or "").split(",") if v.strip()], dtype=np.int64)
        left, top = int(float(shape.get("left"))), int(float(shape.get("top")))
        w, h = int(float(shape.get("width"))), int(float(shape.get("height")))
    except (TypeError, ValueError):
        return BAD_MASK
    if w <= 0 or h <= 0 or (runs < 0).any() or int(runs.sum()) != w * h:
        return BAD_MASK
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True  # runs alternate background, foreground, ...
    patch = np.repeat(values, runs).reshape(h, w)
    return patch_positions(patch, left, top, width, height)
