"""Instance label images: one integer per pixel naming its object (0 = background), one file per image.

The layout of microscopy tools and their datasets (e.g. Cellpose's `*_masks.png`/`*_cp_masks.png`,
StarDist's and the 2018 Data Science Bowl's label TIFFs; see https://cellpose.readthedocs.io/en/latest/train.html
and https://github.com/stardist/stardist#annotating-images): 8-bit or 16-bit PNG, or 8/16/32-bit TIFF
(read with tifffile, https://pypi.org/project/tifffile/). Each label image pairs with the photo of
the same name in --images (a mask suffix such as `_masks` may follow the name). Objects become RLE
masks, so holes and objects that touch keep their exact pixels.

Classes: one class for all (--class NAME, default 'object'); or --class-map mapping label values to
class names (the same value means the same class in every image); or --class-images DIR, a parallel
class-label image per label image (each pixel's class value; an object's class is the most common
value under it), named through --class-map or, without one, by the value itself (category id = value).
"""

from __future__ import annotations

from pathlib import Path

from maskrcnn.data.convert.common import (
    IMAGE_SUFFIXES, UNKNOWN_LABEL, CocoBuilder, Options, image_files, read_class_file, values_to_names,
)
from maskrcnn.data.convert.masks import instances, majority, read_label_image
from maskrcnn.errors import UserError

DEFAULT_CLASS = "object"
# Name endings that mark a label image rather than a photo (longest first, so "_cp_masks" beats "_masks").
MASK_SUFFIXES = tuple(sorted(("_masks", "_mask", "_cp_masks", "_labels", "_label", "_seg", "_instances",
                              "_instance", "_gt", "-masks", "-mask", "-labels", "-label"), key=len, reverse=True))
NO_CLASS = "object with no class under it"
MISSING_CLASS_IMAGE = "missing class image"
CLASS_SIZE_DIFFERS = "class image of another size"


def read(path: Path, options: Options) -> tuple[CocoBuilder, Path]:
    """Return the builder holding every label image in the folder `path` (RLE masks) and the image folder."""
    if not path.is_dir():
        raise UserError(f"label-image input '{path}' is not a folder; give the folder of label images")
    if options.images is None:
        raise UserError("label images need the photos they belong to: give --images DIR")
    image_dir = options.images
    if not image_dir.is_dir():
        raise UserError(f"image folder '{image_dir}' does not exist; give --images DIR with the photos")
    same = path.resolve() == image_dir.resolve()
    # In a shared folder (Cellpose keeps img.png beside img_masks.png) only names with a mask ending are labels.
    labels = [p for p in image_files(path) if not same or _strip_suffix(p.stem) != p.stem]
    if not labels:
        what = f"with a mask ending ({', '.join(MASK_SUFFIXES[-4:])}, ...)" if same else "(.png, .tif, ...)"
        raise UserError(f"no label images {what} in '{path}'; give the folder of instance label images")
    if options.class_images is not None and not options.class_images.is_dir():
        raise UserError(f"class image folder '{options.class_images}' does not exist; give --class-images DIR")

    by_value: dict[int, str] | None = None
    closed = None
    single = options.class_name
    if options.class_map is not None:
        classes = read_class_file(options.class_map)
        by_value = values_to_names(classes, 1)
        if options.class_images is None:
            closed = classes.names()  # label values name classes: ids follow the class file's order
        else:
            closed = {n: v for v, n in sorted(by_value.items(), reverse=True)}  # category id = class value
    elif options.class_images is None and single is None:
        single = DEFAULT_CLASS
    builder = CocoBuilder("label-images", path, single=single, closed=closed, noun="objects")
    photos = {p.stem: p for p in image_files(image_dir) if not same or _strip_suffix(p.stem) == p.stem}
    for label_path in labels:
        builder.begin(label_path)
        _read_one(builder, label_path, photos, image_dir, options.class_images, by_value)
    builder.end()
    return builder, image_dir


def _strip_suffix(stem: str) -> str:
    """Return a label image's name without its mask ending (unchanged if it has none)."""
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _read_one(builder: CocoBuilder, label_path: Path, photos: dict[str, Path], image_dir: Path,
              class_dir: Path | None, by_value: dict[int, str] | None) -> None:
    """Add one label image's photo and objects."""
    labels = read_label_image(label_path)
    if isinstance(labels, str):
        builder.skip_image(labels, label_path.name)
        return
    found = instances(labels, ignore=(0,))
    builder.seen(len(found))
    photo = photos.get(label_path.stem) or photos.get(_strip_suffix(label_path.stem))
    class_labels = None
    if class_dir is not None:
        class_path = _class_image(class_dir, label_path)
        class_labels = read_label_image(class_path) if class_path is not None else MISSING_CLASS_IMAGE
        if isinstance(class_labels, str):
            builder.skip_image(class_labels, f"{class_dir.name}/{label_path.name}", len(found))
            return
        if class_labels.shape != labels.shape:
            builder.skip_image(CLASS_SIZE_DIFFERS, f"{class_dir.name}/{label_path.name}", len(found))
            return
    image = builder.image(photo, image_dir, f"{_strip_suffix(label_path.stem)}.*", objects=len(found),
                          mask_shape=labels.shape)
    if image is None:
        return
    for value, positions in found:
        if class_labels is not None:
            cls = majority(class_labels, positions)
            if cls is None:
                builder.skip(NO_CLASS, f"label {value}")
                continue
            if by_value is None:  # classes named by their value; the value is the category id
                category = builder.category(str(cls))
                builder.label_id(str(cls), cls)
            elif cls in by_value or builder.single is not None:
                category = builder.category(by_value.get(cls))
            else:
                builder.skip(UNKNOWN_LABEL, f"class value {cls}")
                continue
        elif by_value is not None and builder.single is None:
            if value not in by_value:
                builder.skip(UNKNOWN_LABEL, f"label {value}")
                continue
            category = builder.category(by_value[value])
        else:
            category = builder.category(None)
        builder.mask(image, category, positions)


def _class_image(class_dir: Path, label_path: Path) -> Path | None:
    """Return the class image paired with a label image: the same file name, else the same stem."""
    if (class_dir / label_path.name).is_file():
        return class_dir / label_path.name
    stems = {label_path.stem, _strip_suffix(label_path.stem)}
    for p in sorted(class_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and (p.stem in stems or _strip_suffix(p.stem) in stems):
            return p
    return None
