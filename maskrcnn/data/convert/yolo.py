"""Ultralytics YOLO segmentation labels: one .txt file per image, one object per line; read and written.

Format: https://docs.ultralytics.com/datasets/segment/ ("Dataset format"): each line is
`CLASS x1 y1 x2 y2 ...`, the polygon's vertices normalised by the image width and height (0..1), the
class an index into `names` of the dataset's YAML file (a list, or a mapping index: name). Labels
live under labels/ beside images/ with the same relative paths (Ultralytics finds a label by
replacing the last /images/ of the image path with /labels/). A line of 4 numbers is a detection box
(`cx cy w h`, normalised), taken as a rectangle. The files hold no image sizes: they come from the
image files.

Writing: one line per object, so an object with several parts or holes is joined into one polygon
by zero-width bridges (`geometry.join_rings`), as Ultralytics' own COCO converter joins parts; RLE
masks are traced along pixel edges first. The data.yaml written also lists `coco_category_ids`, which
this reader uses to give the categories their original ids back (Ultralytics ignores the key).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from maskrcnn.data.convert import geometry
from maskrcnn.data.convert.common import (
    BAD_COORDINATES, EMPTY_MASK, IMAGE_SUFFIXES, UNKNOWN_LABEL, ClassFile, CocoBuilder, FileReport, Options,
    box_polygon, number, read_class_file, values_to_names,
)
from maskrcnn.errors import UserError
from maskrcnn.rle import decode_rle, rle_area, rle_from_polygons

logger = logging.getLogger("maskrcnn.data.convert")

NAME_FILES = ("data.yaml", "dataset.yaml", "classes.txt", "obj.names")
CROWD = "crowd region (YOLO has none)"
BAD_SEGMENTATION = "malformed segmentation"
DUPLICATE_LABEL_FILE = "image with the same label file as another"


# ---- reading --------------------------------------------------------------------------------------


def read(path: Path, options: Options) -> tuple[CocoBuilder, Path]:
    """Return the builder holding the YOLO label files under the folder `path`, and the image folder."""
    if not path.is_dir():
        raise UserError(f"YOLO input '{path}' is not a folder; give the labels folder (e.g. dataset/labels/train)")
    class_file = options.class_map or _find_class_file(path)
    if class_file is None and options.class_name is None:
        raise UserError(f"no data.yaml or classes.txt found in '{path}' or the folders above it; give the class "
                        "names with --class-map data.yaml (or --class NAME for one class)")
    skip_names = {class_file.resolve()} if class_file else set()
    files = sorted(f for f in path.rglob("*.txt") if f.resolve() not in skip_names and f.name != "classes.txt")
    if not files:
        raise UserError(f"no .txt label files under '{path}'; give the labels folder (e.g. dataset/labels/train)")
    image_dir = options.images or _images_beside(path)
    if not image_dir.is_dir():
        raise UserError(f"image folder '{image_dir}' (for the labels in '{path}') does not exist; give --images DIR")
    names: dict[int, str] = {}
    closed = None
    if options.class_name is None:
        classes = read_class_file(class_file)
        names = values_to_names(classes, 0)
        closed = _category_ids(classes, names)
    builder = CocoBuilder("yolo-seg", path, single=options.class_name, closed=closed, rle=options.rle, noun="lines")
    images = _image_index(image_dir)
    for f in files:
        builder.begin(f)
        key = f.relative_to(path).with_suffix("").as_posix()
        _read_file(builder, f, images.get(key) or images.get(f.stem), image_dir, names)
    builder.end()
    return builder, image_dir


def _find_class_file(path: Path) -> Path | None:
    """Return the class file nearest the labels folder: data.yaml, dataset.yaml, classes.txt or obj.names,
    or a YAML file with `names`, in the folder and up to three above it."""
    for folder in [path, *list(path.resolve().parents)[:3]]:
        for name in NAME_FILES:
            if (folder / name).is_file():
                return folder / name
        for candidate in sorted(folder.glob("*.yaml")):
            try:
                if "names:" in candidate.read_text(encoding="utf-8", errors="replace"):
                    return candidate
            except OSError:
                continue
    return None


def _category_ids(classes: ClassFile, names: dict[int, str]) -> dict[str, int]:
    """Return name -> COCO id: the class index + 1, or the ids a data.yaml written by us lists."""
    ids = {n: i + 1 for i, n in sorted(names.items(), reverse=True)}  # a repeated name keeps its first index
    if classes.path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            saved = (yaml.safe_load(classes.path.read_text(encoding="utf-8")) or {}).get("coco_category_ids")
        except (yaml.YAMLError, AttributeError, OSError):
            saved = None
        order = [n for _, n in sorted(names.items())]
        if (isinstance(saved, list) and len(saved) == len(order) and len(set(order)) == len(order)
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in saved) and len(set(saved)) == len(saved)):
            ids = dict(zip(order, saved))
    return dict(sorted(ids.items(), key=lambda kv: kv[1]))


def _images_beside(labels: Path) -> Path:
    """Return the image folder Ultralytics pairs with a labels folder: the last 'labels' part -> 'images'."""
    parts = list(labels.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            return Path(*parts)
    return labels.parent / "images"


def _image_index(image_dir: Path) -> dict[str, Path]:
    """Return the images under `image_dir` by relative path without suffix (and by bare stem)."""
    index: dict[str, Path] = {}
    for p in sorted(image_dir.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            index.setdefault(p.relative_to(image_dir).with_suffix("").as_posix(), p)
            index.setdefault(p.stem, p)
    return index


def _read_file(builder: CocoBuilder, f: Path, image_path: Path | None, image_dir: Path, names: dict[int, str]) -> None:
    """Add one label file's image and its lines."""
    try:
        lines = [ln.split() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"YOLO label file '{f}' cannot be read as text ({e}); fix or remove it") from None
    builder.seen(len(lines))
    image = builder.image(image_path, image_dir, f"{f.stem}.*", objects=len(lines))
    if image is None:
        return
    _, w, h = image
    for parts in lines:
        cls = number(parts[0])
        values = [number(v) for v in parts[1:]]
        if cls is None or cls != int(cls) or any(v is None for v in values):
            builder.skip(BAD_COORDINATES)
            continue
        cls = int(cls)
        if builder.single is None and cls not in names:
            builder.skip(UNKNOWN_LABEL, f"class {cls}")
            continue
        category = builder.category(names.get(cls, builder.single))
        xy = np.array(values, dtype=np.float64)
        if len(xy) == 4:  # a detection line: cx cy w h
            cx, cy, bw, bh = xy * [w, h, w, h]
            polygon: np.ndarray | str | None = box_polygon(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
        elif len(xy) % 2:
            polygon = BAD_COORDINATES
        else:
            polygon = xy.reshape(-1, 2) * [w, h]
        builder.polygons(image, category, [polygon])


# ---- writing --------------------------------------------------------------------------------------


def write(data: dict[str, Any], out_dir: Path, source: str) -> tuple[int, int]:
    """Write YOLO segmentation labels and data.yaml for a COCO dict into `out_dir`; return (images, lines).

    The labels go to a temporary folder first and are renamed to out_dir/labels at the end, so an
    interrupted run leaves no half-written labels; an existing, non-empty out_dir/labels is refused.
    """
    from maskrcnn.fileio import atomic_write_text

    labels_dir = out_dir / "labels"
    if labels_dir.exists() and (not labels_dir.is_dir() or any(labels_dir.iterdir())):
        raise UserError(f"'{labels_dir}' already exists; choose a new --out folder or remove it")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    report = FileReport(source, "annotations")
    report.objects = len(data["annotations"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".labels.tmp-"))
    written = lines_written = 0
    try:
        seen: set[Path] = set()
        for img in data["images"]:
            rel = _label_path(str(img["file_name"]))
            anns = by_image.get(img["id"], [])
            if rel in seen:
                report.skipped_images[DUPLICATE_LABEL_FILE] += 1
                report.name(DUPLICATE_LABEL_FILE, str(img["file_name"]))
                report.lost_objects += len(anns)
                continue
            seen.add(rel)
            lines = []
            for ann in anns:
                line = _line(ann, index, int(img["width"]), int(img["height"]), report)
                if line is not None:
                    lines.append(line)
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(line + "\n" for line in lines))
            written += 1
            lines_written += len(lines)
        report.images = len(data["images"])
        if labels_dir.exists():
            labels_dir.rmdir()  # empty (checked above)
        tmp.rename(labels_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(out_dir / "data.yaml", _data_yaml(out_dir, categories, source))
    line = report.line()
    if line:
        logger.warning(line)
    return written, lines_written


def _label_path(file_name: str) -> Path:
    """Return the label file's path under labels/: the image's relative path with .txt (base name if it leaves the folder)."""
    rel = Path(file_name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        rel = Path(rel.name)
    return rel.with_suffix(".txt")


def _line(ann: dict[str, Any], index: dict[Any, int], w: int, h: int, report: FileReport) -> str | None:
    """Return one annotation's label line, or None after counting why it has none."""
    def skip(reason: str, name: str | None = None) -> None:
        report.skipped_objects[reason] += 1
        report.name(reason, name)

    if ann.get("iscrowd"):
        return skip(CROWD)
    if ann.get("category_id") not in index:
        return skip(UNKNOWN_LABEL, f"category {ann.get('category_id')}")
    polygon = object_polygon(ann.get("segmentation"), w, h)
    if isinstance(polygon, str):
        return skip(polygon)
    xy = np.clip(polygon / [w, h], 0.0, 1.0).reshape(-1)
    return f"{index[ann['category_id']]} " + " ".join(_fmt(v) for v in xy)


def _fmt(v: float) -> str:
    """Return a normalised coordinate with 6 decimals, trailing zeros dropped (a millionth of the side)."""
    return f"{v:.6f}".rstrip("0").rstrip(".") or "0"


def object_polygon(seg: Any, w: int, h: int) -> np.ndarray | str:
    """Return one polygon [P,2] in pixels for a COCO segmentation, or why there is none.

    One polygon is kept as it is; several that do not overlap are bridged as they are; overlapping
    ones and RLE masks are rasterised and traced along pixel edges (exact: the traced polygon covers
    the mask's pixels and no others), then bridged.
    """
    if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
        polys = []
        for p in seg:
            if len(p) >= 6 and len(p) % 2 == 0 and all(number(v) is not None for v in p):
                polys.append(np.asarray(p, dtype=np.float64).reshape(-1, 2))
        if not polys:
            return BAD_SEGMENTATION
        if len(polys) == 1:
            return polys[0]
        union = rle_from_polygons(polys, h, w)
        each = sum(rle_area(rle_from_polygons([p], h, w)) for p in polys)
        if each == rle_area(union):
            return geometry.join_rings(polys)
        mask = decode_rle(union)
    elif isinstance(seg, dict) and isinstance(seg.get("size"), list) and isinstance(seg.get("counts"), (str, list)):
        if list(seg["size"]) != [h, w]:
            return BAD_SEGMENTATION
        try:
            mask = decode_rle(seg)
        except Exception:  # noqa: BLE001 - pycocotools rejects malformed counts in many ways
            return BAD_SEGMENTATION
    else:
        return BAD_SEGMENTATION
    polygon = geometry.mask_polygon(mask)
    return EMPTY_MASK if polygon is None else polygon


def _data_yaml(out_dir: Path, categories: list[dict[str, Any]], source: str) -> str:
    """Return the dataset YAML: names by class index, and the COCO ids to restore them on the way back."""
    import yaml

    body = {"path": str(out_dir.resolve()), "train": "images", "val": "images",
            "nc": len(categories), "names": {i: str(c["name"]) for i, c in enumerate(categories)},
            "coco_category_ids": [int(c["id"]) for c in categories]}
    header = (f"# Ultralytics YOLO segmentation dataset written by maskrcnn convert from {source}.\n"
              "# Put the images under images/ with the same relative paths as their .txt files under labels/.\n"
              "# coco_category_ids: the original COCO category id of each class (maskrcnn convert reads it back).\n")
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
