"""What every reader shares: options, class files, finding and sizing images, and the COCO builder.

The builder takes objects as polygons or pixel sets, checks them (too few points, zero area,
unknown label...), counts what it skips and logs ONE warning line per input file, as the COCO loader
does per annotation file. Readers raise `UserError` only for input that cannot be read at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from maskrcnn.data.convert import geometry
from maskrcnn.data.jsonfile import load_json  # noqa: F401 - the readers' JSON loader, shared with the COCO loader
from maskrcnn.data.validate import upright_header_size
from maskrcnn.errors import UserError
from maskrcnn.rle import decode_rle, rle_area, rle_from_polygons, rle_from_positions

logger = logging.getLogger("maskrcnn.data.convert")

# Why an object or image was skipped, as the warning lines name it.
SHORT_POLYGON = "polygon with < 3 points"
ZERO_AREA = "polygon with zero area"
OUTSIDE = "outside the image"
DEGENERATE_BOX = "degenerate box"
DEGENERATE_SHAPE = "degenerate circle or ellipse"
BAD_COORDINATES = "malformed coordinates"
UNKNOWN_LABEL = "unknown label"
NO_LABEL = "no label"
UNSUPPORTED_SHAPE = "unsupported shape"
BAD_MASK = "malformed mask"
EMPTY_MASK = "empty mask"
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image file"
SIZE_DIFFERS = "image size differs from the annotation's"
MASK_SIZE_DIFFERS = "mask size differs from the image"
DUPLICATE_IMAGE = "image listed twice"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_EXAMPLES = 3  # names shown per reason in a warning line

@dataclass
class Options:
    """The command line's choices that readers share (each reader uses the ones that apply to it)."""

    images: Path | None = None  # the image folder (each format has a default)
    class_map: Path | None = None  # a class file: names in order, or value -> name
    class_name: str | None = None  # every object gets this one class
    class_images: Path | None = None  # label images: a folder of parallel class-label images
    attribute: str | None = None  # VIA: the region attribute that names the class
    split: str | None = None  # VOC: ImageSets/Segmentation/SPLIT.txt
    rle: bool = False  # store polygon formats' masks as RLE instead


# ---- class files ----------------------------------------------------------------------------------


@dataclass
class ClassFile:
    """A class file's entries in file order: (value or None when the position is the value, name)."""

    path: Path
    entries: list[tuple[int | None, str]]

    def names(self) -> list[str]:
        """Return the distinct names in file order (COCO ids 1..N follow it), without LabelMe's
        `__ignore__` and `_background_` lines (its labels.txt convention), which name no objects."""
        return list(dict.fromkeys(name for _, name in self.entries if name.lower() not in _MARKERS))


# Lines of class files that name no object class (LabelMe's labels.txt begins with the first two).
_MARKERS = ("__ignore__", "_background_", "__background__")


def read_class_file(path: Path) -> ClassFile:
    """Return the entries of a class file: .txt (one name a line, or 'VALUE NAME'), .yaml/.yml
    (a list, a mapping, or a data.yaml's `names`), .json (a list or mapping) or .csv (VALUE,NAME)."""
    if not path.is_file():
        raise UserError(f"class file '{path}' does not exist; give a .txt, .yaml, .json or .csv file of class names")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"class file '{path}' cannot be read as text ({e}); give a UTF-8 file") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            if isinstance(data, dict) and "names" in data:
                data = data["names"]
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix == ".csv":
            data = {}
            for line in text.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    value, _, name = line.partition(",")
                    if value.strip().lower() in ("id", "value", "label", "class_id"):
                        continue  # a header row
                    data[int(value)] = name.strip()
        else:  # .txt, .names (darknet): one name a line, or "VALUE NAME"
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            numbered = [re.fullmatch(r"(\d+)[\s,:]+(.+)", ln) for ln in lines]
            data = {int(m[1]): m[2].strip() for m in numbered} if lines and all(numbered) else lines
    except Exception as e:  # noqa: BLE001 - any parse failure is the same mistake for the user
        raise UserError(f"class file '{path}' cannot be parsed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "write one class name a line, or VALUE NAME lines") from None
    if isinstance(data, list):
        entries: list[tuple[int | None, str]] = [(None, str(n)) for n in data]
    elif isinstance(data, dict):
        try:
            entries = [(int(k), str(v)) for k, v in data.items()]
        except (TypeError, ValueError):
            raise UserError(f"class file '{path}' maps keys that are not integers; map VALUE: NAME") from None
    else:
        raise UserError(f"class file '{path}' holds no list or mapping of class names")
    entries = [(v, n.strip()) for v, n in entries if n.strip()]
    if not entries:
        raise UserError(f"class file '{path}' names no classes")
    return ClassFile(path, entries)


def values_to_names(classes: ClassFile, first: int) -> dict[int, str]:
    """Return value -> name for formats where a number names the class (YOLO: `first`=0; masks: 1).

    Names without a value get their position + `first`. For masks (`first`=1) a leading
    'background' line names the value 0 and is dropped, as many VOC-style class lists begin with it.
    """
    entries = classes.entries
    if first == 1:
        while entries and entries[0][0] is None and entries[0][1].lower() == "__ignore__":
            entries = entries[1:]
        if entries and entries[0][0] is None and entries[0][1].lower() in ("background", *_MARKERS):
            entries = entries[1:]  # values still start at 1
    return {pos + first if v is None else v: n for pos, (v, n) in enumerate(entries)}


# ---- files ----------------------------------------------------------------------------------------


def image_size(path: Path) -> tuple[int, int] | str:
    """Return the upright (width, height) of an image from its header, or the reason it cannot be used.

    Reads the header only (no pixel decoding), and swaps width and height for EXIF rotations by 90
    degrees, as the training loader and check-dataset do.
    """
    if not path.is_file():
        return MISSING_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return upright_header_size(im)
    except Exception:  # noqa: BLE001 - not an image PIL can read, truncated header, ...
        return UNREADABLE_IMAGE



def find_image(name: str, folders: Iterable[Path]) -> Path | None:
    """Return the first existing file `folder / name` (name with / or \\ separators), else by its base name."""
    name = name.replace("\\", "/")
    folders = [f for f in dict.fromkeys(folders) if f is not None]
    for folder in folders:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    base = name.rsplit("/", 1)[-1]
    for folder in folders:
        candidate = folder / base
        if candidate.is_file():
            return candidate
    return None


def relative_name(path: Path, image_dir: Path) -> str:
    """Return the COCO file_name of `path`: relative to the image folder, with forward slashes."""
    try:
        return path.resolve().relative_to(image_dir.resolve()).as_posix()
    except ValueError:  # outside the image folder: a relative path with '..' still finds it
        return Path(os.path.relpath(path.resolve(), image_dir.resolve())).as_posix()


def image_files(folder: Path) -> list[Path]:
    """Return the image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def points_array(values: Any) -> np.ndarray | None:
    """Return [[x, y], ...] or a flat [x, y, ...] list as float [P,2], or None if it is not finite numbers."""
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.ndim == 1 and a.size % 2 == 0:
        a = a.reshape(-1, 2)
    if a.ndim != 2 or a.shape[1] != 2 or not np.isfinite(a).all():
        return None
    return a


def number(value: Any) -> float | None:
    """Return `value` as a finite float, or None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def box_polygon(x1: Any, y1: Any, x2: Any, y2: Any, degrees: Any = 0) -> np.ndarray | str:
    """Return a box's corners as a polygon [4,2] (rotated `degrees` clockwise), or why it cannot be one."""
    values = [number(v) for v in (x1, y1, x2, y2, degrees)]
    if any(v is None for v in values):
        return BAD_COORDINATES
    x1, y1, x2, y2, degrees = values
    if x1 == x2 or y1 == y2:
        return DEGENERATE_BOX
    return geometry.rectangle(x1, y1, x2, y2, degrees)


def ellipse_polygon(cx: Any, cy: Any, rx: Any, ry: Any, radians: Any = 0) -> np.ndarray | str:
    """Return an ellipse (radians clockwise) as a polygon, or why it cannot be one."""
    values = [number(v) for v in (cx, cy, rx, ry, radians)]
    if any(v is None for v in values):
        return BAD_COORDINATES
    cx, cy, rx, ry, radians = values
    if rx == 0 or ry == 0:
        return DEGENERATE_SHAPE
    return geometry.ellipse(cx, cy, abs(rx), abs(ry), radians)


def patch_positions(patch: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    """Return the sorted column-major image positions (x * height + y) of a boolean patch's pixels
    placed with its top-left corner at (left, top); pixels outside the image are dropped."""
    ys, xs = np.nonzero(patch)
    xs, ys = xs.astype(np.int64) + left, ys.astype(np.int64) + top
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    return np.sort(xs[inside] * height + ys[inside])


# ---- the builder ----------------------------------------------------------------------------------


@dataclass
class FileReport:
    """What was skipped in one input file, for its warning line."""

    source: str
    noun: str = "objects"
    images: int = 0
    objects: int = 0
    skipped_images: Counter = field(default_factory=Counter)
    skipped_objects: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)  # reason -> examples
    lost_objects: int = 0  # objects on skipped images

    def name(self, reason: str, name: str | None) -> None:
        """Remember `name` (a label, shape or file) as an example of `reason`."""
        if name is not None:
            seen = self.names.setdefault(reason, [])
            if name not in seen:
                seen.append(name)

    def describe(self, counts: Counter) -> str:
        """Return '2 unknown label ('dgo', 'catt'); 1 degenerate box' for reason counts."""
        parts = []
        for reason, n in counts.items():
            names = self.names.get(reason, [])
            shown = ", ".join(repr(x) for x in names[:_EXAMPLES]) + (", ..." if len(names) > _EXAMPLES else "")
            parts.append(f"{n} {reason}" + (f" ({shown})" if names else ""))
        return "; ".join(parts)

    def line(self) -> str | None:
        """Return the file's warning line, or None if nothing was skipped."""
        parts = []
        if self.skipped_images:
            n = sum(self.skipped_images.values())
            lost = (f"; {_count(self.lost_objects, self.noun)} on {'it' if n == 1 else 'them'}"
                    if self.lost_objects else "")
            # Images skipped before their file was looked at (an unreadable label image) count too.
            parts.append(f"{n} of {_count(max(self.images, n), 'images')} ({self.describe(self.skipped_images)}{lost})")
        if self.skipped_objects:
            parts.append(f"{sum(self.skipped_objects.values())} of {_count(self.objects, self.noun)} "
                         f"({self.describe(self.skipped_objects)})")
        return f"{self.source}: skipped " + " and ".join(parts) if parts else None


def _count(n: int, plural: str) -> str:
    """Return '1 image' or '3 images' for a plural noun ending in s."""
    return f"{n} {plural[:-1] if n == 1 else plural}"


class CocoBuilder:
    """Collects images and objects from a reader and returns a COCO dict with checked, clipped geometry.

    Categories: `single` puts every object in one class; `closed` (name -> id, or names for ids
    1..N) refuses labels outside it; otherwise every label seen (or `declare`d) becomes a category,
    with ids 1..N in sorted name order, or the ids given with `label_id`.
    """

    def __init__(self, fmt: str, source: Path, single: str | None = None,
                 closed: dict[str, int] | list[str] | None = None, rle: bool = False, noun: str = "shapes") -> None:
        """`noun`: what the warning lines count (the input's unit: shapes, regions, lines, objects)."""
        self.fmt, self.source, self.single, self.rle, self.noun = fmt, source, single, rle, noun
        if isinstance(closed, list):
            closed = {n: i + 1 for i, n in enumerate(dict.fromkeys(closed))}
        self.closed = closed
        self._ids: dict[str, int | None] = {}  # open categories: name -> fixed id or None (sorted later)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []  # category_id holds the name until `result`
        self._file_names: set[str] = set()
        self.report: FileReport | None = None
        self.warnings = 0
        self.skipped_objects = 0
        self.skipped_images = 0

    # -- per input file --

    def begin(self, source: str | os.PathLike) -> None:
        """Start counting for one input file (its warning line comes with `end`)."""
        self.end()
        self.report = FileReport(str(source), self.noun)

    def end(self) -> None:
        """Log the current input file's warning line, if anything in it was skipped."""
        if self.report is not None:
            line = self.report.line()
            if line:
                logger.warning(line)
                self.warnings += 1
            self.report = None

    def _rep(self) -> FileReport:
        if self.report is None:
            self.report = FileReport(str(self.source), self.noun)
        return self.report

    # -- categories --

    def declare(self, names: Iterable[str]) -> None:
        """List categories the input defines even if no object uses them (stable ids across splits)."""
        if self.single is None and self.closed is None:
            for n in names:
                self._ids.setdefault(str(n), None)

    def category(self, label: Any, shapes: int = 1, name: str | None = None) -> str | None:
        """Return the category name for an object's label, or None after counting its `shapes` as skipped.

        `name` is how the label appears in the warning (default: the label itself).
        """
        if self.single is not None:
            return self.single
        if label is None or (isinstance(label, str) and not label.strip()):
            self.skip(NO_LABEL, count=shapes)
            return None
        label = str(label).strip()
        if self.closed is not None:
            if label not in self.closed:
                self.skip(UNKNOWN_LABEL, name or label, count=shapes)
                return None
            return label
        self._ids.setdefault(label, None)
        return label

    def label_id(self, name: str, category_id: int) -> None:
        """Give an open category a fixed id (formats whose labels are numbers keep them as ids)."""
        self._ids[name] = category_id

    # -- images and objects --

    def image(self, path: Path | None, image_dir: Path, name: str, stated: tuple[Any, Any] | None = None,
              objects: int = 0, mask_shape: tuple[int, ...] | None = None) -> tuple[int, int, int] | None:
        """Add the image file at `path` (None: not found); return (id, width, height) or None if skipped.

        `stated` is the (width, height) the annotation gives: a different file size means the
        annotation was drawn on another version of the image; `mask_shape` is a label image's
        (height, width), which must match the image. `objects` counts as lost if it is skipped.
        """
        rep = self._rep()
        rep.images += 1
        size: tuple[int, int] | str = image_size(path) if path is not None else MISSING_IMAGE
        if isinstance(size, str):
            return self.skip_image(size, name, objects)
        if stated is not None and all(number(v) is not None for v in stated):
            sw, sh = (int(round(float(v))) for v in stated)
            if (sw, sh) != size and (sw, sh) != (0, 0):
                return self.skip_image(SIZE_DIFFERS, f"{name}: file {size[0]}x{size[1]}, annotation {sw}x{sh}", objects)
        if mask_shape is not None and tuple(mask_shape) != (size[1], size[0]):
            mh, mw = mask_shape
            return self.skip_image(MASK_SIZE_DIFFERS, f"{name}: image {size[0]}x{size[1]}, mask {mw}x{mh}", objects)
        file_name = relative_name(path, image_dir)
        if file_name in self._file_names:
            return self.skip_image(DUPLICATE_IMAGE, file_name, objects)
        self._file_names.add(file_name)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        return image_id, size[0], size[1]

    def skip_image(self, reason: str, name: str, objects: int = 0) -> None:
        """Count an image that cannot be used (and the objects on it); return None."""
        rep = self._rep()
        rep.skipped_images[reason] += 1
        rep.name(reason, name)
        rep.lost_objects += objects
        self.skipped_images += 1
        return None

    def skip(self, reason: str, name: str | None = None, count: int = 1) -> None:
        """Count shapes that cannot be converted (`name`: the label or shape the warning shows)."""
        rep = self._rep()
        rep.skipped_objects[reason] += count
        rep.name(reason, name)
        self.skipped_objects += count

    def seen(self, n: int = 1) -> None:
        """Count shapes read from the input (the 'of N' in the warning line)."""
        self._rep().objects += n

    def polygons(self, image: tuple[int, int, int], category: str | None,
                 polygons: list[np.ndarray | str | None]) -> bool:
        """Add an object made of polygons (each [P,2] pixels, one input shape; None: malformed, a string:
        why the reader could not make one); return whether it was kept.

        Polygons are clipped to the image; ones with < 3 points or no area are dropped and counted,
        and the object is left out if none is left. The box is the polygons' extent and the area
        their rasterised pixel count, as in COCO's own files.
        """
        if category is None:
            return False
        image_id, w, h = image
        kept, reasons = [], []
        for p in polygons:
            if isinstance(p, str):  # the reader's own reason (degenerate box, ...)
                reasons.append(p)
            elif p is None:
                reasons.append(BAD_COORDINATES)
            elif len(p) < 3:
                reasons.append(SHORT_POLYGON)
            elif geometry.collinear(p):
                reasons.append(ZERO_AREA)
            else:
                c = geometry.clip_polygon(p, w, h)
                if len(c) < 3 or geometry.collinear(c):
                    reasons.append(OUTSIDE)
                else:
                    kept.append(c)
        for reason in reasons:  # each polygon is one shape of the input
            self.skip(reason)
        if not kept:
            return False
        rle = rle_from_polygons(kept, h, w)
        area = rle_area(rle)
        if area == 0:  # thinner than pycocotools' sampling: the loader would find an empty mask
            self.skip(ZERO_AREA, count=len(kept))
            return False
        allp = np.concatenate(kept)
        (x1, y1), (x2, y2) = allp.min(axis=0), allp.max(axis=0)
        seg: Any = rle if self.rle else [[round(float(v), 3) for v in p.reshape(-1)] for p in kept]
        self._add(image_id, category, seg, area, [float(x1), float(y1), float(x2 - x1), float(y2 - y1)])
        return True

    def mask(self, image: tuple[int, int, int], category: str | None, positions: np.ndarray) -> bool:
        """Add an object given by its pixels' sorted column-major positions (x * height + y) as an RLE."""
        if category is None:
            return False
        image_id, w, h = image
        if len(positions) == 0:
            self.skip(EMPTY_MASK)
            return False
        rle = rle_from_positions(positions, h, w)
        xs, ys = positions // h, positions % h
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        self._add(image_id, category, rle, int(len(positions)), box)
        return True

    def union(self, image: tuple[int, int, int], category: str | None, parts: list[np.ndarray | str | None],
              masks: list[np.ndarray | str]) -> bool:
        """Add one RLE object: pixel sets (sorted positions; a string: why one could not be read) together
        with the rasterised polygons `parts` (shapes grouped with a mask); return whether it was kept."""
        if category is None:
            return False
        _, w, h = image
        positions = []
        for m in masks:
            if isinstance(m, str):
                self.skip(m)
            else:
                positions.append(m)
        good = []
        for p in parts:
            if isinstance(p, np.ndarray) and len(p) >= 3:
                good.append(p)
            else:
                self.skip(p if isinstance(p, str) else SHORT_POLYGON if isinstance(p, np.ndarray) else BAD_COORDINATES)
        if good:
            raster = decode_rle(rle_from_polygons(good, h, w))
            positions.append(np.flatnonzero(raster.ravel(order="F")))
        if not positions:
            return False
        return self.mask(image, category, np.unique(np.concatenate(positions)))

    def _add(self, image_id: int, category: str, seg: Any, area: int, bbox: list[float]) -> None:
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category,
                                 "segmentation": seg, "area": area, "bbox": [round(v, 3) for v in bbox],
                                 "iscrowd": 0})

    # -- the result --

    def result(self) -> dict[str, Any]:
        """Return the COCO dict (and log the last file's warning line)."""
        self.end()
        if self.single is not None:
            ids = {self.single: 1}
        elif self.closed is not None:
            ids = dict(self.closed)
        elif all(v is not None for v in self._ids.values()):
            ids = dict(sorted(self._ids.items(), key=lambda kv: kv[1]))
        else:
            ids = {n: i + 1 for i, n in enumerate(sorted(self._ids))}
        annotations = [{**a, "category_id": ids[a["category_id"]]} for a in self.annotations]
        categories = [{"id": i, "name": n, "supercategory": ""} for n, i in sorted(ids.items(), key=lambda kv: kv[1])]
        info = {"description": f"converted from {self.fmt} '{self.source}' by maskrcnn convert"}
        return {"info": info, "images": self.images, "annotations": annotations, "categories": categories}
