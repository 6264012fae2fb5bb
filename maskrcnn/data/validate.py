"""Check a COCO-format dataset before training on it, and write a cleaned copy.

`validate_dataset(ann_file, image_dir)` returns a list of `Finding`s: each has a kind (see `KINDS`),
a severity (error or warning) and the ids it concerns. Image files are checked from their headers
only (size, format), so a large dataset is checked quickly; `decode=True` also decodes every pixel to
catch truncated files. `clean_data` drops what cannot be used and corrects image sizes, so the result
checks clean and `CocoDataset` loads it.

Only a file that is not a COCO object at all (bad JSON, missing 'images' / 'annotations' /
'categories' lists) raises `UserError`; everything else is a finding.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from maskrcnn.data.coco_checks import is_int
from maskrcnn.data.jsonfile import load_json
from maskrcnn.data.polygons import collinear, distinct_vertices, polygon_self_intersects
from maskrcnn.data.image_io import DEFAULT_MAX_PIXELS, _check_size, read_image
from maskrcnn.errors import ImageReadError, UserError
from maskrcnn.rle import RleError, rle_area, rle_from_counts

ERROR, WARNING = "error", "warning"

# Every kind of finding, its severity and what it means (in the order reports list them).
KINDS: dict[str, tuple[str, str]] = {
    "no-images": (ERROR, "the file lists no images"),
    "no-categories": (ERROR, "the file lists no categories"),
    "no-usable-annotations": (ERROR, "no image has a valid non-crowd annotation; nothing to train on"),
    "bad-image-entry": (ERROR, "an image entry is not an object or lacks an integer 'id' or a 'file_name'"),
    "duplicate-image-id": (ERROR, "two image entries share an id (the first is kept)"),
    "missing-image": (ERROR, "the image file does not exist"),
    "unreadable-image": (ERROR, "the image file cannot be read (corrupt, not an image, too small or too large)"),
    "bad-image-size": (ERROR, "an image entry has no positive integer 'width' and 'height'"),
    "size-mismatch": (ERROR, "the JSON width/height differ from the image file's"),
    "bad-category-entry": (ERROR, "a category entry is not an object or lacks an integer 'id' or a 'name'"),
    "duplicate-category-id": (ERROR, "two category entries share an id (the first is kept)"),
    "bad-annotation-entry": (ERROR, "an annotation is not an object or lacks 'image_id' or 'category_id'"),
    "duplicate-annotation-id": (ERROR, "two annotations share an id (the first is kept)"),
    "unknown-image-id": (ERROR, "an annotation's image_id is not in 'images'"),
    "unknown-category-id": (ERROR, "an annotation's category_id is not in 'categories'"),
    "bad-iscrowd": (ERROR, "iscrowd is not 0 or 1"),
    "bad-bbox": (ERROR, "bbox is not a list of 4 finite numbers"),
    "bbox-non-positive": (ERROR, "bbox width or height is <= 0"),
    "bbox-outside-image": (ERROR, "bbox does not overlap the image at all"),
    "missing-segmentation": (ERROR, "no segmentation (Mask R-CNN needs a mask for every object)"),
    "bad-segmentation": (ERROR, "segmentation is neither a list of polygons nor an RLE object"),
    "empty-polygon": (ERROR, "a polygon has no coordinates"),
    "bad-polygon": (ERROR, "a polygon is not a list of finite numbers"),
    "polygon-odd-coordinates": (ERROR, "a polygon has an odd number of coordinates"),
    "polygon-too-few-points": (ERROR, "a polygon has fewer than 3 points"),
    "polygon-zero-area": (ERROR, "a polygon's points are all on one line (encloses nothing)"),
    "polygon-outside-image": (ERROR, "the polygons lie entirely outside the image"),
    "bad-rle": (ERROR, "an RLE mask is malformed (size or counts)"),
    "rle-size-mismatch": (ERROR, "an RLE's size differs from the image's [height, width]"),
    "empty-mask": (ERROR, "an RLE mask has no foreground pixel"),
    "polygon-self-intersection": (WARNING, "a polygon crosses or touches itself (it still rasterises)"),
    "bbox-partly-outside": (WARNING, "bbox extends more than 1 pixel past the image border (training clips it)"),
    "crowd-polygon": (WARNING, "a crowd (iscrowd=1) region given as polygons; COCO uses RLE for crowds"),
    "missing-bbox": (WARNING, "no bbox; training derives it from the mask but COCO evaluation needs it"),
    "missing-area": (WARNING, "no area; COCO evaluation needs it for its small/medium/large ranges"),
    "missing-annotation-id": (WARNING, "an annotation has no integer id (pycocotools indexes by id)"),
    "duplicate-file-name": (WARNING, "two images use the same file"),
    "unused-category": (WARNING, "no annotation uses this category"),
}

BORDER_TOLERANCE = 1.0  # pixels a bbox may stick out before it is reported (COCO has rounding slop)


@dataclass
class Finding:
    """One problem: its kind, severity, a one-line message, and the entry and ids it concerns."""

    kind: str
    message: str
    section: str = ""  # "images", "annotations", "categories", or "" for the whole file
    index: int | None = None  # position of the entry in its section's list
    image_id: Any = None
    annotation_id: Any = None
    category_id: Any = None

    @property
    def severity(self) -> str:
        """Return "error" or "warning" (fixed per kind)."""
        return KINDS[self.kind][0]

    def ref(self) -> str:
        """Return a short name of the entry, e.g. "ann 12", "image 3", "categories[4]"."""
        if self.section == "annotations":
            return f"ann {self.annotation_id}" if self.annotation_id is not None else f"annotations[{self.index}]"
        if self.section == "images":
            return f"image {self.image_id}" if self.image_id is not None else f"images[{self.index}]"
        if self.section == "categories":
            return f"category {self.category_id}" if self.category_id is not None else f"categories[{self.index}]"
        return "-"

    def to_dict(self) -> dict[str, Any]:
        """Return the finding as a JSON-ready dict (severity included, unset ids left out)."""
        d = {"severity": self.severity, **asdict(self)}
        return {k: v for k, v in d.items() if v is not None and v != ""}


# ---- image files --------------------------------------------------------------------------------


@dataclass
class ImageProbe:
    """What the file of one image entry holds: its upright (width, height), or why it cannot be used."""

    size: tuple[int, int] | None
    kind: str | None = None  # "missing-image" or "unreadable-image" when size is None
    message: str = ""


_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF rotations by 90 degrees: read_image swaps width and height


def upright_header_size(im: Image.Image) -> tuple[int, int]:
    """Return an opened image's (width, height) as read_image will give it, from the header alone."""
    w, h = im.size
    if im.format == "TIFF":  # PIL may report TIFF sizes already rotated; start from the stored ones
        w, h = im.tag_v2.get(256, w), im.tag_v2.get(257, h)
    if _orientation(im) in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return int(w), int(h)


def _orientation(im: Image.Image) -> int | None:
    """Return the EXIF orientation tag from the header, without decoding pixels."""
    if im.format == "PNG":  # PIL's PNG getexif() decodes the whole image to look past the pixel data
        raw = im.info.get("exif")
        if not raw:
            return None
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(_EXIF_ORIENTATION)
    return im.getexif().get(_EXIF_ORIENTATION)


def probe_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = False) -> ImageProbe:
    """Return the upright size of the image at `path` read from its header (or every pixel if `decode`)."""
    path = Path(path)
    if not decode:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = upright_header_size(im)
            _check_size(path, (w, h), max_pixels)
            return ImageProbe((int(w), int(h)))
        except ImageReadError as e:
            return ImageProbe(None, "unreadable-image", str(e))
        except Exception:  # noqa: BLE001 - any failure: let the image reader name it, below
            pass
    # The full reader either decodes the file or raises the project's one-line error for it.
    try:
        array = read_image(path, max_pixels)
    except ImageReadError as e:
        return ImageProbe(None, "missing-image" if not path.exists() else "unreadable-image", str(e))
    return ImageProbe((int(array.shape[1]), int(array.shape[0])))


class ImageProber:
    """Probes image files under one folder by file name, each file once (results are cached)."""

    def __init__(self, image_dir: str | os.PathLike, decode: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 8) -> None:
        self.image_dir = Path(image_dir)
        self.decode = decode
        self.max_pixels = max_pixels
        self.workers = workers
        self._cache: dict[str, ImageProbe] = {}

    def __call__(self, file_name: str) -> ImageProbe:
        """Return the probe of `image_dir / file_name`."""
        if file_name not in self._cache:
            self._cache[file_name] = probe_image(self.image_dir / file_name, self.max_pixels, self.decode)
        return self._cache[file_name]

    def prefetch(self, file_names: Iterable[str]) -> None:
        """Probe many files with a few threads (file reads overlap; headers are small)."""
        todo = sorted({n for n in file_names if n not in self._cache})
        if len(todo) < 16 or self.workers <= 1:
            return
        with ThreadPoolExecutor(self.workers) as pool:
            probes = pool.map(lambda n: probe_image(self.image_dir / n, self.max_pixels, self.decode), todo)
            self._cache.update(zip(todo, probes))


# ---- checking -----------------------------------------------------------------------------------


def _finite_numbers(values: list) -> bool:
    """Return whether every item is an int or float (not bool) and finite."""
    if not {type(v) for v in values} <= {int, float}:
        return False
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all()) if values else True


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_annotations(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Return the parsed annotation file, or raise UserError (one line naming it) if it is not COCO."""
    path = Path(ann_file)
    data = load_json(path)
    _check_top_level(data, path)
    return data


def _check_top_level(data: Any, path: str | os.PathLike) -> None:
    """Raise UserError unless `data` is an object with 'images', 'annotations' and 'categories' lists."""
    if not isinstance(data, dict):
        raise UserError(f"annotation file '{path}' holds a JSON {type(data).__name__}, not a COCO object "
                        "with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise UserError(f"annotation file '{path}' has no '{key}' key; a COCO instances file needs "
                            "'images', 'annotations' and 'categories' lists")
        if not isinstance(data[key], list):
            raise UserError(f"annotation file '{path}': '{key}' must be a list, got {type(data[key]).__name__}")


class _Checker:
    """One pass over a loaded COCO dict, collecting findings."""

    def __init__(self, data: dict[str, Any], probe: Callable[[str], ImageProbe] | None) -> None:
        self.data = data
        self.probe = probe
        self.findings: list[Finding] = []
        self.image_sizes: dict[int, tuple[int, int] | None] = {}  # (width, height) to check geometry against
        self.file_sizes: dict[int, tuple[int, int] | None] = {}  # (width, height) of the image files
        self.category_ids: set[int] = set()

    def add(self, kind: str, message: str, **where: Any) -> None:
        self.findings.append(Finding(kind, message, **where))

    def run(self) -> list[Finding]:
        self.check_categories()
        self.check_images()
        used, usable = self.check_annotations()
        for i, cat in enumerate(self.data["categories"]):
            cid = cat.get("id") if isinstance(cat, dict) else None
            if is_int(cid) and cid in self.category_ids and cid not in used:
                used.add(cid)  # report a duplicated id once
                self.add("unused-category", f"category {cid} ({cat.get('name')!r}) has no annotation",
                         section="categories", index=i, category_id=cid)
        if self.data["images"] and self.category_ids and not usable:
            self.add("no-usable-annotations", "no image has a valid non-crowd annotation; there is nothing to train on")
        order = {k: n for n, k in enumerate(KINDS)}
        self.findings.sort(key=lambda f: order[f.kind])  # stable: file order within a kind
        return self.findings

    # -- categories and images

    def check_categories(self) -> None:
        cats = self.data["categories"]
        if not cats:
            self.add("no-categories", "'categories' is empty; list the classes as {\"id\": 1, \"name\": ...}")
        for i, cat in enumerate(cats):
            cid = cat.get("id") if isinstance(cat, dict) else None
            where = {"section": "categories", "index": i}
            if not isinstance(cat, dict) or not is_int(cid):
                self.add("bad-category-entry", f"categories[{i}] is not an object with an integer 'id'", **where)
            elif cid in self.category_ids:
                self.add("duplicate-category-id", f"categories[{i}] repeats category id {cid}",
                         category_id=cid, **where)
            else:
                self.category_ids.add(cid)
                if "name" not in cat:
                    self.add("bad-category-entry", f"category {cid} has no 'name'", category_id=cid, **where)

    def check_images(self) -> None:
        images = self.data["images"]
        if not images:
            self.add("no-images", "'images' is empty")
        entries = [img for img in images if isinstance(img, dict) and isinstance(img.get("file_name"), str)]
        if self.probe is not None and hasattr(self.probe, "prefetch"):
            self.probe.prefetch(img["file_name"] for img in entries if img["file_name"])  # type: ignore[attr-defined]
        file_owner: dict[str, int] = {}
        for i, img in enumerate(images):
            iid = img.get("id") if isinstance(img, dict) else None
            where = {"section": "images", "index": i}
            if not isinstance(img, dict) or not is_int(iid):
                self.add("bad-image-entry", f"images[{i}] is not an object with an integer 'id'", **where)
                continue
            where["image_id"] = iid
            if iid in self.image_sizes:
                self.add("duplicate-image-id", f"images[{i}] repeats image id {iid}", **where)
                continue
            self.image_sizes[iid] = None
            name = img.get("file_name")
            if not isinstance(name, str) or not name:
                self.add("bad-image-entry", f"image {iid} has no 'file_name'", **where)
                continue
            if name in file_owner:
                self.add("duplicate-file-name", f"image {iid} uses '{name}', as image {file_owner[name]} does", **where)
            file_owner.setdefault(name, iid)
            probe = self.probe(name) if self.probe is not None else ImageProbe(None)
            self.file_sizes[iid] = probe.size
            if probe.kind:
                self.add(probe.kind, probe.message, **where)
            w, h = img.get("width"), img.get("height")
            if not (is_int(w) and is_int(h) and w > 0 and h > 0):
                self.add("bad-image-size", f"image {iid} needs positive integer 'width' and 'height', has {w!r} x {h!r}"
                         + (f"; the file is {probe.size[0]}x{probe.size[1]}" if probe.size else ""), **where)
                self.image_sizes[iid] = probe.size
                continue
            if probe.size and probe.size != (w, h):
                self.add("size-mismatch", f"image {iid} ('{name}') is {probe.size[0]}x{probe.size[1]} in the file but "
                         f"{w}x{h} in the JSON", **where)
            self.image_sizes[iid] = (w, h)

    # -- annotations

    def check_annotations(self) -> tuple[set[int], int]:
        """Check every annotation; return the category ids used and the number of usable non-crowd ones."""
        used: set[int] = set()
        usable = 0
        seen: set[int] = set()
        for i, ann in enumerate(self.data["annotations"]):
            before = len(self.findings)
            if not isinstance(ann, dict):
                self.add("bad-annotation-entry", f"annotations[{i}] is not an object",
                         section="annotations", index=i)
                continue
            aid = ann.get("id")
            where = {"section": "annotations", "index": i, "annotation_id": aid if is_int(aid) else None,
                     "image_id": ann.get("image_id"), "category_id": ann.get("category_id")}
            name = f"annotation {aid}" if is_int(aid) else f"annotations[{i}]"
            if not is_int(aid):
                self.add("missing-annotation-id", f"{name} has no integer 'id' (has {aid!r})", **where)
            elif aid in seen:
                self.add("duplicate-annotation-id", f"annotations[{i}] repeats annotation id {aid}", **where)
                continue
            else:
                seen.add(aid)
            if "image_id" not in ann or "category_id" not in ann:
                missing = [k for k in ("image_id", "category_id") if k not in ann]
                self.add("bad-annotation-entry", f"{name} has no {' or '.join(repr(m) for m in missing)}", **where)
                continue
            iid, cid = ann["image_id"], ann["category_id"]
            if not (is_int(iid) and iid in self.image_sizes):
                self.add("unknown-image-id", f"{name} refers to image_id {iid!r}, which is not in 'images'", **where)
            if not (is_int(cid) and cid in self.category_ids):
                self.add("unknown-category-id", f"{name} has category_id {cid!r}, which is not in 'categories'",
                         **where)
            else:
                used.add(cid)
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1) or isinstance(crowd, (bool, float)):
                self.add("bad-iscrowd", f"{name} has iscrowd {crowd!r}; use 0 or 1", **where)
            size = self.image_sizes.get(iid) if is_int(iid) else None
            self.check_bbox(ann, name, size, where)
            self.check_segmentation(ann, name, size, crowd == 1, where)
            if "area" not in ann:
                self.add("missing-area", f"{name} has no 'area'", **where)
            errors = any(f.severity == ERROR for f in self.findings[before:])
            usable += not errors and crowd == 0
        return used, usable

    def check_bbox(self, ann: dict, name: str, size: tuple[int, int] | None, where: dict) -> None:
        bbox = ann.get("bbox")
        if bbox is None:
            self.add("missing-bbox", f"{name} has no 'bbox'", **where)
            return
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            self.add("bad-bbox", f"{name} has bbox {_short(bbox)}; expected [x, y, width, height]", **where)
            return
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            self.add("bbox-non-positive", f"{name} has bbox {bbox} with width or height <= 0", **where)
            return
        if size is None:
            return
        w, h = size
        if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
            self.add("bbox-outside-image", f"{name} has bbox {bbox}, entirely outside its {w}x{h} image", **where)
        elif min(x, y) < -BORDER_TOLERANCE or x + bw > w + BORDER_TOLERANCE or y + bh > h + BORDER_TOLERANCE:
            self.add("bbox-partly-outside", f"{name} has bbox {bbox}, past the border of its {w}x{h} image", **where)

    def check_segmentation(self, ann: dict, name: str, size: tuple[int, int] | None, crowd: bool, where: dict) -> None:
        seg = ann.get("segmentation")
        if seg is None or (isinstance(seg, (list, dict)) and not seg):
            self.add("missing-segmentation", f"{name} has no segmentation", **where)
        elif isinstance(seg, list):
            if crowd:
                self.add("crowd-polygon", f"{name} is a crowd region (iscrowd=1) given as polygons", **where)
            self.check_polygons(seg, name, size, where)
        elif isinstance(seg, dict):
            iid = where["image_id"]
            self.check_rle(seg, name, size, where, self.file_sizes.get(iid) if is_int(iid) else None)
        else:
            self.add("bad-segmentation", f"{name} has segmentation of type {type(seg).__name__}", **where)

    def check_polygons(self, polygons: list, name: str, size: tuple[int, int] | None, where: dict) -> None:
        valid = []
        for k, poly in enumerate(polygons):
            what = f"{name} polygon {k}"
            if not isinstance(poly, list) or not _finite_numbers(poly):
                self.add("bad-polygon", f"{what} is not a list of finite numbers: {_short(poly)}", **where)
            elif not poly:
                self.add("empty-polygon", f"{what} is empty", **where)
            elif len(poly) % 2:
                self.add("polygon-odd-coordinates", f"{what} has {len(poly)} coordinates (an odd count)", **where)
            elif len(poly) < 6:
                self.add("polygon-too-few-points", f"{what} has {len(poly) // 2} points; a polygon needs 3", **where)
            else:
                points = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                distinct = distinct_vertices(points)
                # The loader's test (not the shoelace sum: a symmetric bow tie sums to 0 yet covers pixels).
                if collinear(distinct):
                    self.add("polygon-zero-area", f"{what} encloses no area (its points are on one line)", **where)
                    continue
                if polygon_self_intersects(distinct, distinct=True):
                    self.add("polygon-self-intersection", f"{what} crosses or touches itself", **where)
                valid.append(points)
        if valid and size is not None:
            allp = np.concatenate(valid)
            (x1, y1), (x2, y2) = allp.min(axis=0), allp.max(axis=0)
            w, h = size
            if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
                self.add("polygon-outside-image", f"{name} polygons span x {x1:g}..{x2:g}, y {y1:g}..{y2:g}, "
                         f"outside its {w}x{h} image", **where)

    def check_rle(self, seg: dict, name: str, size: tuple[int, int] | None, where: dict,
                  file_size: tuple[int, int] | None = None) -> None:
        rle_size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(is_int(v) and v > 0 for v in rle_size)):
            self.add("bad-rle", f"{name} has RLE size {_short(rle_size)}; expected [height, width]", **where)
            return
        if not isinstance(counts, (list, str)):
            self.add("bad-rle", f"{name} has RLE counts of type {type(counts).__name__}; expected a string or list",
                     **where)
            return
        rh, rw = rle_size
        if size is not None and (rh, rw) != (size[1], size[0]):
            hint = ("; it matches the image file, so correcting the image's width/height fixes both"
                    if file_size == (rw, rh) else "")
            self.add("rle-size-mismatch", f"{name} has RLE size [{rh}, {rw}] but its image is {size[0]}x{size[1]} "
                     f"(size must be [height, width] = [{size[1]}, {size[0]}]){hint}", **where)
            return
        try:
            rle = rle_from_counts(counts, rh, rw)  # the loader's judgement: what it would skip is reported
        except RleError as e:
            self.add("bad-rle", f"{name} has {e}", **where)
            return
        area = rle_area(rle)
        if area == 0:
            self.add("empty-mask", f"{name} has an RLE mask with no foreground pixel", **where)


def _short(value: Any, limit: int = 60) -> str:
    """Return repr(value), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_data(data: Any, probe: Callable[[str], ImageProbe] | None = None,
               ann_file: str | os.PathLike = "<annotations>") -> list[Finding]:
    """Return the findings for an already-loaded COCO dict; `probe(file_name)` describes each image file.

    Without a probe the image files are not looked at. Raises UserError (naming `ann_file`) if the
    dict lacks the top-level lists.
    """
    _check_top_level(data, ann_file)
    return _Checker(data, probe).run()


def validate_dataset(ann_file: str | os.PathLike, image_dir: str | os.PathLike, decode: bool = False,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Finding]:
    """Return every finding for the dataset `ann_file` with images under `image_dir`."""
    data = load_annotations(ann_file)
    return check_data(data, ImageProber(image_dir, decode=decode, max_pixels=max_pixels), ann_file)


# ---- fixing -------------------------------------------------------------------------------------

# Image errors fixed by taking the size from the file (when the file is readable).
_RESIZABLE = {"size-mismatch", "bad-image-size"}


@dataclass
class FixSummary:
    """What `clean_data` changed, and the findings its result still has."""

    dropped: Counter
    resized_images: int
    renumbered_annotations: int
    remaining: list[Finding]


def clean_data(data: dict[str, Any], probe: Callable[[str], ImageProbe],
               ann_file: str | os.PathLike = "<annotations>") -> tuple[dict[str, Any], FixSummary]:
    """Return a cleaned copy of `data` (the input is not changed) and what was done.

    Drops every entry with an error (duplicates keep the first; unreadable or missing images go with
    their annotations), takes width/height from the file where they disagree, and gives annotations
    without an integer id a new one. Repeats until nothing changes, since a drop or a new size can
    invalidate other entries. Errors about the whole file (no categories, ...) remain in `remaining`.
    """
    fixed = dict(data)
    for key in ("images", "annotations", "categories"):
        fixed[key] = list(data[key])
    dropped: Counter = Counter()
    resized: set[int] = set()
    renumbered = 0
    findings = check_data(fixed, probe, ann_file)
    for _ in range(10):  # each round only removes entries or settles a size/id, so this ends quickly
        drop: dict[str, set[int]] = {"images": set(), "annotations": set(), "categories": set()}
        resize: dict[int, tuple[int, int]] = {}
        for f in findings:
            if f.severity != ERROR or f.index is None:
                continue
            if f.kind in _RESIZABLE and (size := probe(fixed["images"][f.index]["file_name"]).size):
                resize[f.index] = size
            else:
                drop[f.section].add(f.index)
        no_id = [f.index for f in findings if f.kind == "missing-annotation-id" and f.index not in drop["annotations"]]
        if not any(drop.values()) and not resize and not no_id:
            break
        if resize:  # settle sizes first: annotations that disagreed with the old size may now fit
            drop = {"images": drop["images"], "annotations": set(), "categories": set()}
            no_id = []
        for i, (w, h) in resize.items():
            if i not in drop["images"]:
                image = fixed["images"][i] = copy.copy(fixed["images"][i])
                image["width"], image["height"] = w, h
                resized.add(image["id"])
        if no_id:
            next_id = 1 + max((a["id"] for a in fixed["annotations"] if isinstance(a, dict) and is_int(a.get("id"))),
                              default=0)
            for offset, i in enumerate(no_id):
                fixed["annotations"][i] = {**fixed["annotations"][i], "id": next_id + offset}
            renumbered += len(no_id)
        for key, indices in drop.items():
            dropped[key] += len(indices)
            fixed[key] = [e for i, e in enumerate(fixed[key]) if i not in indices]
        findings = check_data(fixed, probe, ann_file)
    return fixed, FixSummary(dropped, len(resized), renumbered, findings)


def count_by_kind(findings: list[Finding]) -> Counter:
    """Return how many findings there are of each kind."""
    return Counter(f.kind for f in findings)
