"""One folder per image, with the photo in `images/` and one binary PNG per object in `masks/`.

The layout of the 2018 Data Science Bowl (BBBC038, https://bbbc.broadinstitute.org/BBBC038 and
https://www.kaggle.com/c/data-science-bowl-2018/data) and of matterport's Mask R-CNN `nucleus`
sample (samples/nucleus/nucleus.py, which reads `ID/images/ID.png` and `ID/masks/*.png`):

    DIR/ID/images/ID.png        the photo (any image suffix; the only image there also does)
    DIR/ID/masks/NAME.png       one object: 0 = background, one other value (255 or 1) = the object

DIR may also be one such image folder itself. With --images PHOTOS, the photos are PHOTOS/ID.* instead
(images/ may then be missing) and COCO file names are relative to PHOTOS. Every object gets one class (--class NAME, default
'object'). Masks become RLEs, exact to the pixel; overlapping masks are kept as they are (COCO
allows it) and counted in a warning line. A folder that cannot be used (no images/, no masks/,
an unreadable photo) is skipped and named in a warning line; the other folders are converted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maskrcnn.data.convert.common import (
    EMPTY_MASK, MASK_SIZE_DIFFERS, CocoBuilder, Options, image_files, logger,
)
from maskrcnn.data.convert.label_images import DEFAULT_CLASS
from maskrcnn.data.convert.masks import read_label_image
from maskrcnn.errors import UserError

NO_IMAGES_FOLDER = "folder without images/"
NO_MASKS_FOLDER = "folder without masks/"
NO_PHOTO = "no image in images/"
SEVERAL_PHOTOS = "several images in images/, none named after the folder"
NOT_BINARY = "non-binary mask (needs 0 and one other value)"
NOT_IN_IMAGES = "no image named after the folder in --images"


def read(path: Path, options: Options) -> tuple[CocoBuilder, Path]:
    """Return the builder holding every image folder under `path` (RLE masks) and the image folder."""
    if not path.is_dir():
        raise UserError(f"mask-folders input '{path}' is not a folder; give the folder of per-image folders "
                        "(ID/images/ID.png, ID/masks/*.png)")
    if options.class_map is not None:
        raise UserError("mask-folders puts every object in one class: give --class NAME, not --class-map")
    one = (path / "images").is_dir() or (path / "masks").is_dir()  # DIR is one image folder itself
    folders = [path] if one else sorted(p for p in path.iterdir() if p.is_dir())
    if not any((f / "images").is_dir() or (f / "masks").is_dir() for f in folders):
        raise UserError(f"'{path}' holds no image folders with images/ and masks/ (ID/images/ID.png, "
                        "ID/masks/*.png); give the folder that holds them")
    image_dir = options.images or path
    moved = {p.stem: p for p in image_files(image_dir)} if options.images is not None else None
    builder = CocoBuilder("mask-folders", path, single=options.class_name or DEFAULT_CLASS, noun="masks")
    overlapping: list[str] = []
    for folder in folders:
        builder.begin(folder)
        if _read_folder(builder, folder, image_dir, moved):
            overlapping.append(folder.name)
    builder.end()
    if overlapping:
        shown = ", ".join(repr(n) for n in overlapping[:3]) + (", ..." if len(overlapping) > 3 else "")
        logger.warning("%s: %d image folder%s with overlapping masks (%s), kept as they are", path,
                       len(overlapping), "" if len(overlapping) == 1 else "s", shown)
    return builder, image_dir


def _photo(folder: Path, moved: dict[str, Path] | None) -> Path | str:
    """Return the photo of an image folder, or why there is none.

    images/ID.* or the only image in images/; with `moved` (--images: the photos by name), ID.* there.
    """
    if moved is not None:
        return moved.get(folder.name, NOT_IN_IMAGES)
    if not (folder / "images").is_dir():
        return NO_IMAGES_FOLDER
    photos = image_files(folder / "images")
    named = [p for p in photos if p.stem == folder.name]
    if named:
        return named[0]
    if len(photos) == 1:
        return photos[0]
    return SEVERAL_PHOTOS if photos else NO_PHOTO


def _read_folder(builder: CocoBuilder, folder: Path, image_dir: Path, moved: dict[str, Path] | None) -> bool:
    """Add one image folder's photo and masks; return whether two of its masks overlap."""
    photo = _photo(folder, moved)
    if photo == NO_IMAGES_FOLDER:
        builder.skip_image(NO_IMAGES_FOLDER, folder.name)
        return False
    if not (folder / "masks").is_dir():  # unlabelled (as the DSB test set), not an image without objects
        builder.skip_image(NO_MASKS_FOLDER, folder.name)
        return False
    mask_files = image_files(folder / "masks")
    builder.seen(len(mask_files))
    if isinstance(photo, str):
        builder.skip_image(photo, folder.name, len(mask_files))
        return False
    image = builder.image(photo, image_dir, photo.name, objects=len(mask_files))
    if image is None:
        return False
    _, width, height = image
    covered = np.zeros(width * height, dtype=bool)  # column-major, as the positions
    overlap = False
    for mask_file in mask_files:
        positions = _mask_positions(mask_file, height, width)
        if isinstance(positions, tuple):
            reason, detail = positions
            builder.skip(reason, f"masks/{mask_file.name}{detail}")
            continue
        overlap = overlap or bool(covered[positions].any())
        covered[positions] = True
        builder.mask(image, builder.category(None), positions)
    return overlap


def _mask_positions(path: Path, height: int, width: int) -> np.ndarray | tuple[str, str]:
    """Return a binary mask file's object pixels as sorted column-major positions, or (why not, detail)."""
    mask = read_label_image(path)
    if isinstance(mask, str):
        return mask, ""
    if mask.shape != (height, width):
        return MASK_SIZE_DIFFERS, f": {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}"
    values = np.unique(mask)
    if np.count_nonzero(values) > 1:
        return NOT_BINARY, f": values {', '.join(str(v) for v in values[:4])}{', ...' if len(values) > 4 else ''}"
    positions = np.flatnonzero(mask.ravel(order="F"))
    return positions if len(positions) else (EMPTY_MASK, "")
