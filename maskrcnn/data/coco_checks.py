"""What a COCO annotation file must hold: its lists and entries, checked one by one, and each annotation's
segmentation judged usable or skipped (with the reason shown in the dataset's summary line).

Shared by `coco` (the pycocotools index for evaluation) and `coco_table` (the loader's parsed arrays),
so both refuse the same files with the same messages and skip the same annotations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maskrcnn.data.image_io import DEFAULT_MAX_PIXELS
from maskrcnn.data.jsonfile import load_json
from maskrcnn.data.polygons import clip_to_rectangle, collinear
from maskrcnn.errors import UserError
from maskrcnn.rle import RleCoverageError, RleError, rle_area_and_box, rle_from_counts

# Why an annotation was skipped, as shown in the one-line summary per dataset.
ZERO_AREA_BOX = "zero-area box"
SHORT_POLYGON = "polygon with < 3 points"
EMPTY_MASK = "empty mask or outside the image"
NO_SEGMENTATION = "no segmentation"
BAD_SEGMENTATION = "malformed segmentation"
SIZE_MISMATCH = "mask size differs from the image"
NON_FINITE = "non-finite coordinates"
BAD_BOX = "malformed bbox"
BAD_RLE = "RLE counts that do not cover the image"


# ---- one annotation's segmentation ------------------------------------------------------------


def prepare_segmentation(seg: Any, h: int, w: int) -> tuple[Any, list[float], str | None]:
    """Return (segmentation ready for pycocotools, its xyxy extent, skip reason or None)."""
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return None, [], NO_SEGMENTATION
    if isinstance(seg, list):
        if not all(isinstance(p, list) for p in seg):
            return None, [], BAD_SEGMENTATION
        polygons = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None, [], SHORT_POLYGON
        if not all(isinstance(v, (int, float)) for p in polygons for v in p):
            return None, [], BAD_SEGMENTATION  # strings, nulls or nested lists among the coordinates
        points = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
        if not all(np.isfinite(p).all() for p in points):
            return None, [], NON_FINITE
        # pycocotools rasterises every pixel step along each edge, so a vertex at 1e12 would take
        # forever (and all memory): clip polygons that reach far outside the image to a window around it.
        points = [_clip_polygon(p, w, h) for p in points]
        points = [p for p in points if len(p) >= 3 and np.isfinite(p).all()]
        if not points:
            return None, [], EMPTY_MASK
        polygons = [p.reshape(-1).tolist() for p in points]
        allp = np.concatenate(points)
        x1, y1 = allp.min(axis=0)
        x2, y2 = allp.max(axis=0)
        # Collinear or all-outside polygons rasterise to an empty mask. (Not "zero shoelace area": a
        # figure-eight's two lobes cancel in the signed area, yet pycocotools fills both.)
        if all(collinear(p) for p in points) or x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            return None, [], EMPTY_MASK
        return polygons, [float(x1), float(y1), float(x2), float(y2)], None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not isinstance(counts, (list, str, bytes)):
            return None, [], BAD_SEGMENTATION
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            return None, [], BAD_SEGMENTATION
        if [size[0], size[1]] != [h, w]:
            return None, [], SIZE_MISMATCH
        try:
            rle = rle_from_counts(counts, h, w)
        except RleCoverageError:
            return None, [], BAD_RLE
        except RleError:
            return None, [], BAD_SEGMENTATION
        area, (x, y, bw, bh) = rle_area_and_box(rle)
        if area == 0:
            return None, [], EMPTY_MASK
        return rle, [x, y, x + bw, y + bh], None
    return None, [], BAD_SEGMENTATION


def _clip_polygon(points: np.ndarray, w: int, h: int) -> np.ndarray:
    """Return the polygon [P,2] clipped to a window one image size around the image (unchanged if inside).

    pycocotools rounds vertices to 1/5 pixel, so a clipped polygon may differ from the
    unclipped one by a pixel along an edge; with the window this wide only absurd annotations
    (vertices more than an image size outside) are clipped at all.
    """
    margin = float(max(h, w))
    return clip_to_rectangle(points, (-margin, -margin), (w + margin, h + margin))


# ---- loading and checking the JSON ------------------------------------------------------------


def load_annotation_file(path: Path) -> dict[str, Any]:
    """Return the parsed annotation file, or raise UserError naming it."""
    return load_json(path, "annotation file")


def _require(entry: Any, keys: Sequence[str], where: str, path: Path) -> None:
    """Raise UserError unless `entry` is a JSON object with all `keys`."""
    if not isinstance(entry, dict):
        raise UserError(f"'{path}': {where} must be an object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise UserError(f"'{path}': {where} is missing '{key}'; every entry needs {', '.join(keys)}")


def is_int(value: Any) -> bool:
    """Return whether a JSON value is an integer (JSON's true/false are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_top_level(data: Any, path: Path) -> None:
    """Raise UserError unless `data` has 'images' and 'categories' lists (setting absent annotations to [])."""
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a COCO object with 'images', 'annotations' and 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"'{path}' has no '{key}' list; is it a COCO instances file?")
    if data.get("annotations") is None:
        data["annotations"] = []  # image-info-only files (test sets) are fine
    if not isinstance(data["annotations"], list):
        raise UserError(f"'{path}': 'annotations' must be a list, got {type(data['annotations']).__name__}")


def check_images(images: list, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[int, dict]:
    """Return the image entries by id after checking their keys and types."""
    by_id: dict[int, dict] = {}
    for i, img in enumerate(images):
        _require(img, ("id", "file_name", "width", "height"), f"images[{i}]", path)
        if not is_int(img["id"]):
            raise UserError(f"'{path}': images[{i}] has id {img['id']!r}; image ids must be integers")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise UserError(f"'{path}': images[{i}] has file_name {img['file_name']!r}; expected a file name")
        w, h = img["width"], img["height"]
        if not (is_int(w) and is_int(h)) or min(w, h) < 1:
            raise UserError(
                f"'{path}': images[{i}] needs positive integer 'width' and 'height', got {w!r} and {h!r}"
            )
        if w * h > max_pixels:
            raise too_many_pixels(path, i, img["file_name"], w, h, max_pixels)
        if img["id"] in by_id:
            raise UserError(f"'{path}': image id {img['id']} appears twice in 'images'")
        by_id[img["id"]] = img
    return by_id


def too_many_pixels(path: Path, index: int, file_name: str, w: int, h: int, max_pixels: int) -> UserError:
    return UserError(
        f"'{path}': images[{index}] ('{file_name}') is {w}x{h} = {w * h} pixels, above the limit "
        f"of {max_pixels}; downscale it or raise input.max_pixels"
    )


def check_categories(categories: list, path: Path) -> set[int]:
    """Return the category ids after checking the entries' keys and types."""
    seen: set[int] = set()
    for i, cat in enumerate(categories):
        _require(cat, ("id", "name"), f"categories[{i}]", path)
        if not is_int(cat["id"]) or cat["id"] in seen:
            raise UserError(f"'{path}': categories[{i}] has a non-integer or repeated id {cat['id']!r}")
        if not isinstance(cat["name"], (str, int, float)) or isinstance(cat["name"], bool):
            raise UserError(f"'{path}': categories[{i}] has name {cat['name']!r}; expected a string")
        seen.add(cat["id"])
    if not seen:
        raise UserError(f"'{path}' lists no categories")
    return seen


def check_annotation(ann: Any, i: int, path: Path) -> tuple[int, int, int | None, int]:
    """Return (image_id, category_id, id or None, iscrowd) of annotations[i] after checking their types.

    Whether the ids refer to listed images and categories, and are unique, is the caller's check
    (`unknown_image`, `unknown_category`, `bad_annotation_id` word the errors).
    """
    _require(ann, ("image_id", "category_id"), f"annotations[{i}]", path)
    image_id, category_id, ann_id = ann["image_id"], ann["category_id"], ann.get("id")
    if not is_int(image_id):
        raise unknown_image(path, i, image_id)
    if not is_int(category_id):
        raise unknown_category(path, i, category_id)
    if ann_id is not None and not is_int(ann_id):
        raise bad_annotation_id(path, i, ann_id)
    crowd = ann.get("iscrowd", 0)
    if not (crowd is None or (isinstance(crowd, (int, float)) and crowd in (0, 1))):
        raise UserError(f"'{path}': annotations[{i}] has iscrowd {crowd!r}; expected 0 or 1")
    return image_id, category_id, ann_id, int(crowd or 0)


def unknown_image(path: Path, i: int, image_id: Any) -> UserError:
    return UserError(f"'{path}': annotations[{i}] refers to image_id {image_id!r}, which is not in 'images'")


def unknown_category(path: Path, i: int, category_id: Any) -> UserError:
    return UserError(f"'{path}': annotations[{i}] has category_id {category_id!r}, which is not in 'categories'")


def bad_annotation_id(path: Path, i: int, ann_id: Any) -> UserError:
    return UserError(f"'{path}': annotations[{i}] has a non-integer or repeated id {ann_id!r}")


def check_schema(data: Any, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[Any, dict]:
    """Return images by id after checking keys, types and references (filling ann ids and iscrowd)."""
    check_top_level(data, path)
    images = check_images(data["images"], path, max_pixels)
    categories = check_categories(data["categories"], path)
    anns = data["annotations"]
    next_id = 1 + max((a["id"] for a in anns if isinstance(a, dict) and is_int(a.get("id"))), default=0)
    ann_ids: set[int] = set()
    for i, ann in enumerate(anns):
        image_id, category_id, ann_id, ann["iscrowd"] = check_annotation(ann, i, path)
        if image_id not in images:
            raise unknown_image(path, i, image_id)
        if category_id not in categories:
            raise unknown_category(path, i, category_id)
        if ann_id is None:  # pycocotools indexes annotations by id
            ann["id"], next_id = next_id, next_id + 1
        elif ann_id in ann_ids:
            raise bad_annotation_id(path, i, ann_id)
        ann_ids.add(ann["id"])
    return images


def check_annotation_file(path: str | os.PathLike) -> None:
    """Raise UserError naming the problem unless `path` is a readable COCO instances file."""
    path = Path(path)
    check_schema(load_annotation_file(path), path, max_pixels=2**63)
