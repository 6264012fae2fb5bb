"""Pascal VOC segmentation masks: SegmentationObject (which object) + SegmentationClass (which class) PNGs.

Format: the VOC2012 development kit, section "Segmentation" (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/htmldoc/devkit_doc.html
and http://host.robots.ox.ac.uk/pascal/VOC/voc2012/): for each image NAME, JPEGImages/NAME.jpg,
SegmentationClass/NAME.png and SegmentationObject/NAME.png, palette PNGs whose indices are the
values. In the class image 0 is background, 1..20 the classes in the devkit's order, 255 "void"
(object borders and difficult regions); in the object image 1..N number the objects and 255 is void.
Void pixels belong to no object. ImageSets/Segmentation/SPLIT.txt lists a split's image names.
Masks become RLEs, so holes and objects that touch keep their exact pixels.
"""

from __future__ import annotations

from pathlib import Path

from maskrcnn.data.convert.common import (
    IMAGE_SUFFIXES, UNKNOWN_LABEL, CocoBuilder, Options, read_class_file, values_to_names,
)
from maskrcnn.data.convert.masks import instances, majority, read_label_image, voc_colours
from maskrcnn.errors import UserError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOID = 255
NO_CLASS = "object with no class under it"
CLASS_SIZE_DIFFERS = "class and object masks of different sizes"


def read(path: Path, options: Options) -> tuple[CocoBuilder, Path]:
    """Return the builder holding the VOC folder's objects (RLE masks) and the image folder."""
    objects_dir, classes_dir = path / "SegmentationObject", path / "SegmentationClass"
    if not objects_dir.is_dir():
        nested = sorted(p.parent for p in path.glob("*/SegmentationObject")) if path.is_dir() else []
        hint = f" (found one in '{nested[0]}')" if nested else ""
        raise UserError(f"'{path}' has no SegmentationObject folder{hint}; give the VOC folder holding "
                        "SegmentationObject, SegmentationClass and JPEGImages (e.g. VOCdevkit/VOC2012)")
    image_dir = options.images or path / "JPEGImages"
    if not image_dir.is_dir():
        raise UserError(f"image folder '{image_dir}' does not exist; give --images DIR (VOC keeps them in JPEGImages)")
    if options.split:
        split_file = path / "ImageSets" / "Segmentation" / f"{options.split}.txt"
        if not split_file.is_file():
            raise UserError(f"split file '{split_file}' does not exist; give --split train, val or trainval, "
                            "or leave --split out to convert every mask")
        names = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
    else:
        names = sorted(p.stem for p in objects_dir.glob("*.png"))
    if not names:
        raise UserError(f"no .png masks in '{objects_dir}'; give the VOC folder with SegmentationObject PNGs")
    if options.class_map:
        by_value = values_to_names(read_class_file(options.class_map), 1)
    else:
        by_value = {i + 1: n for i, n in enumerate(VOC_CLASSES)}
    closed = {n: v for v, n in sorted(by_value.items(), reverse=True)}  # category id = the class value
    builder = CocoBuilder("voc-masks", path, single=options.class_name, closed=closed, noun="objects")
    colours = voc_colours()
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    for name in names:
        objects_png = objects_dir / f"{name}.png"
        builder.begin(objects_png)
        objects = read_label_image(objects_png, colours)
        classes = read_label_image(classes_dir / f"{name}.png", colours)
        if isinstance(objects, str) or isinstance(classes, str):
            builder.skip_image(objects if isinstance(objects, str) else classes,
                               f"{name}.png" if isinstance(objects, str) else f"SegmentationClass/{name}.png")
            continue
        found = instances(objects, ignore=(0, VOID))
        builder.seen(len(found))
        if classes.shape != objects.shape:
            builder.skip_image(CLASS_SIZE_DIFFERS, f"{name}.png", len(found))
            continue
        image = builder.image(images.get(name), image_dir, f"{name}.jpg", objects=len(found), mask_shape=objects.shape)
        if image is None:
            continue
        for value, positions in found:
            cls = majority(classes, positions, ignore=(0, VOID))
            if cls is None:
                builder.skip(NO_CLASS, f"object {value}")
                continue
            if builder.single is None and cls not in by_value:
                builder.skip(UNKNOWN_LABEL, f"class value {cls}")
                continue
            builder.mask(image, builder.category(by_value.get(cls)), positions)
    builder.end()
    return builder, image_dir
