"""VGG Image Annotator (VIA) 2.x: a project or annotation JSON file with regions per image.

Format: https://www.robots.ox.ac.uk/~vgg/software/via/ (VIA 2.x; its JSON is described in
https://gitlab.com/vgg/via/-/blob/master/via-2.x.y/CodeDoc.md). A project file keeps the images under
`_via_img_metadata`; "Export Annotations (as json)" writes that mapping alone. Each image entry has
`filename`, `size` (the file's size in BYTES, so image sizes are read from the image files) and
`regions`: a list (a mapping in VIA 1.x), each with `shape_attributes` (`name`: polygon with
`all_points_x`/`all_points_y`, rect with `x, y, width, height`, circle with `cx, cy, r`, ellipse with
`cx, cy, rx, ry` and `theta` in radians; polyline and point enclose no area) and `region_attributes`,
user-defined, where the class is (see `class_of`). The options of the class attribute declared in
`_via_attributes` all become categories, used or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maskrcnn.data.convert.common import (
    BAD_COORDINATES, NO_LABEL, UNSUPPORTED_SHAPE, CocoBuilder, Options, box_polygon, ellipse_polygon, find_image,
    load_json, number, read_class_file,
)
from maskrcnn.errors import UserError

# Region attribute names taken as the class when the file has several attributes and no --attribute.
CLASS_KEYS = ("class", "label", "name", "category", "type", "object")


def read(path: Path, options: Options) -> tuple[CocoBuilder, Path]:
    """Return the builder holding the VIA file's images and regions, and the image folder."""
    if path.is_dir():
        raise UserError(f"VIA input '{path}' is a folder; give the project or annotation .json file VIA saved")
    if not path.is_file():
        raise UserError(f"VIA file '{path}' does not exist; give the project or annotation .json file VIA saved")
    data = load_json(path, "VIA file", "save the project again from VIA")
    if isinstance(data, dict) and "_via_img_metadata" in data:
        metadata, attributes = data["_via_img_metadata"], (data.get("_via_attributes") or {}).get("region") or {}
        settings_path = ((data.get("_via_settings") or {}).get("core") or {}).get("default_filepath") or ""
    else:
        metadata, attributes, settings_path = data, {}, ""
    if isinstance(data, dict) and "project" in data and "file" in data and "metadata" in data:
        raise UserError(f"'{path}' is a VIA 3 project; save it from VIA 2 (or export its annotations as VIA 2 JSON)")
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) and "filename" in v for v in metadata.values()):
        raise UserError(f"'{path}' is not a VIA 2 project or annotation file (no image entries with 'filename' "
                        "and 'regions'); export the annotations from VIA as JSON")
    image_dir = options.images or path.parent
    folders = [image_dir, path.parent]
    if settings_path and "://" not in settings_path and Path(settings_path).is_dir():
        folders.append(Path(settings_path))  # the folder the project loaded its images from
    closed = read_class_file(options.class_map).names() if options.class_map else None
    builder = CocoBuilder("via", path, single=options.class_name, closed=closed, rle=options.rle, noun="regions")
    key = options.attribute or _class_attribute(attributes)
    if key and isinstance(attributes.get(key), dict):
        builder.declare(str(k) for k in (attributes[key].get("options") or {}))
    builder.begin(path)
    for entry in metadata.values():
        _read_image(builder, entry, folders, image_dir, key)
    builder.end()
    return builder, image_dir


def _class_attribute(attributes: dict[str, Any]) -> str | None:
    """Return the declared region attribute that names the class: the only one, or one of CLASS_KEYS."""
    if len(attributes) == 1:
        return next(iter(attributes))
    for k in attributes:
        if k.lower() in CLASS_KEYS:
            return k
    return None


def class_of(region_attributes: Any, key: str | None) -> str | None:
    """Return a region's class: the value of attribute `key`, else of the only attribute, else of the
    first of CLASS_KEYS present. A checkbox attribute ({option: true}) names its one ticked option."""
    if not isinstance(region_attributes, dict) or not region_attributes:
        return None
    if key is None:
        if len(region_attributes) == 1:
            key = next(iter(region_attributes))
        else:
            key = next((k for k in region_attributes if k.lower() in CLASS_KEYS), None)
    value = region_attributes.get(key) if key is not None else None
    if isinstance(value, dict):  # checkbox: the ticked options
        ticked = [k for k, v in value.items() if v]
        value = ticked[0] if len(ticked) == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return (value.strip() or None) if isinstance(value, str) else None


def _read_image(builder: CocoBuilder, entry: dict[str, Any], folders: list[Path], image_dir: Path,
                key: str | None) -> None:
    """Add one image entry and its regions."""
    regions = entry.get("regions") or []
    if isinstance(regions, dict):  # VIA 1.x: {"0": region, ...}
        regions = list(regions.values())
    builder.seen(len(regions))
    name = str(entry.get("filename"))
    found = None if "://" in name else find_image(name, folders)
    image = builder.image(found, image_dir, name, objects=len(regions))
    if image is None:
        return
    for region in regions:
        shape = region.get("shape_attributes") if isinstance(region, dict) else None
        if not isinstance(shape, dict):
            builder.skip(BAD_COORDINATES)
            continue
        kind = shape.get("name")
        if kind not in ("polygon", "rect", "circle", "ellipse"):
            builder.skip(UNSUPPORTED_SHAPE, str(kind))
            continue
        if builder.single is None:
            label = class_of(region.get("region_attributes"), key)
            if label is None:
                builder.skip(NO_LABEL)
                continue
        else:
            label = builder.single
        builder.polygons(image, builder.category(label), [_polygon(shape)])


def _polygon(shape: dict[str, Any]) -> np.ndarray | str | None:
    """Return the polygon of a VIA polygon, rect, circle or ellipse, or why there is none."""
    kind = shape["name"]
    if kind == "rect":
        x, y, w, h = (number(shape.get(k)) for k in ("x", "y", "width", "height"))
        if None in (x, y, w, h):
            return BAD_COORDINATES
        return box_polygon(x, y, x + w, y + h)
    if kind == "circle":
        return ellipse_polygon(shape.get("cx"), shape.get("cy"), shape.get("r"), shape.get("r"))
    if kind == "ellipse":
        return ellipse_polygon(shape.get("cx"), shape.get("cy"), shape.get("rx"), shape.get("ry"), shape.get("theta", 0))
    xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
    if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
        return BAD_COORDINATES
    values = [number(v) for v in xs + ys]
    if any(v is None for v in values):
        return BAD_COORDINATES
    return np.array(values, dtype=np.float64).reshape(2, -1).T
