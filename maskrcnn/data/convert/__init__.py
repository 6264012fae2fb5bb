"""Convert other annotation formats to COCO instance segmentation JSON, and COCO to YOLO segmentation.

`read_annotations(fmt, path, options)` returns a COCO dict and the image folder its file names are
relative to; `write_coco` and `yolo.write` store it. One module per format, each citing the format's
documentation: labelme, cvat (CVAT for images 1.1 XML), via (VGG Image Annotator 2.x), yolo
(Ultralytics segmentation .txt), voc (Pascal VOC SegmentationObject/SegmentationClass PNGs),
label_images (instance label PNG/TIFF), mask_folders (DSB2018's
per-image folders of binary masks). Polygon formats stay polygons (`Options.rle` rasterises
them); mask formats become RLEs, exact to the pixel. Objects that cannot be converted are counted
and named in one warning line per input file; input that cannot be read raises `UserError`.

The converters themselves use numpy, Pillow, pycocotools and PyYAML (and tifffile for TIFF label
images), not torch; `maskrcnn.data`'s own __init__ still imports torch when this package loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from maskrcnn.data.convert.common import CocoBuilder, Options, load_json
from maskrcnn.errors import UserError

# Kept in step with maskrcnn.commands.convert (which must not import this package for --help).
INPUT_FORMATS = ("coco", "labelme", "cvat-xml", "via", "yolo-seg", "voc-masks", "label-images", "mask-folders")
OUTPUT_FORMATS = ("coco", "yolo-seg")

__all__ = ["INPUT_FORMATS", "OUTPUT_FORMATS", "Options", "read_annotations", "read_coco", "write_coco"]


def _reader(fmt: str) -> Callable[[Path, Options], tuple[CocoBuilder, Path]]:
    """Return the reader function of an input format (imported on demand)."""
    if fmt == "labelme":
        from maskrcnn.data.convert.labelme import read
    elif fmt == "cvat-xml":
        from maskrcnn.data.convert.cvat import read
    elif fmt == "via":
        from maskrcnn.data.convert.via import read
    elif fmt == "yolo-seg":
        from maskrcnn.data.convert.yolo import read
    elif fmt == "voc-masks":
        from maskrcnn.data.convert.voc import read
    elif fmt == "label-images":
        from maskrcnn.data.convert.label_images import read
    elif fmt == "mask-folders":
        from maskrcnn.data.convert.mask_folders import read
    else:
        raise UserError(f"unknown input format '{fmt}'; choose one of {', '.join(INPUT_FORMATS)}")
    return read


def read_annotations(fmt: str, path: str | Path, options: Options | None = None) -> tuple[dict[str, Any], Path, CocoBuilder | None]:
    """Return (COCO dict, image folder, the builder with its skip counts; None for COCO input) for `path` in `fmt`."""
    path = Path(path)
    options = options or Options()
    if fmt == "coco":
        return read_coco(path), options.images or path.parent, None
    if not path.exists():
        raise UserError(f"input '{path}' does not exist; give the {fmt} annotations (see maskrcnn convert --help)")
    builder, image_dir = _reader(fmt)(path, options)
    data = builder.result()
    if not data["images"]:
        raise UserError(f"no image of '{path}' could be converted (see the warnings above); check that the image "
                        "files are where the annotations say, or give --images DIR")
    return data, image_dir, builder


def read_coco(path: Path) -> dict[str, Any]:
    """Return a COCO annotation file's dict after checking it has the lists a conversion needs."""
    if not path.is_file():
        raise UserError(f"COCO file '{path}' does not exist; give the annotation .json file")
    data = load_json(path, "COCO file", "check it with maskrcnn check-dataset")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError(f"'{path}' is not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)")
    for key, needed in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name")),
                        ("annotations", ("image_id", "category_id"))):
        for k, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or any(n not in entry for n in needed):
                raise UserError(f"'{path}': {key}[{k}] lacks one of {', '.join(needed)}; "
                                "maskrcnn check-dataset --fix writes a cleaned copy")
    return data


def write_coco(data: dict[str, Any], path: Path) -> None:
    """Write the COCO dict to `path` atomically (a temp file renamed into place)."""
    from maskrcnn.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(data, separators=(",", ":")))
