"""`maskrcnn convert`: LabelMe, CVAT, VIA, YOLO, VOC masks, label images or mask folders to COCO JSON; COCO to YOLO."""

from __future__ import annotations

import argparse
from pathlib import Path

from maskrcnn.errors import UserError

HELP = ("convert annotations to COCO JSON: maskrcnn convert --from FORMAT INPUT --out OUT.json [--images DIR] "
        "(or COCO to YOLO segmentation: --from coco IN.json --to yolo-seg --out DIR)")

# The same lists as maskrcnn.data.convert's, written out so --help imports no numpy (a test compares them).
INPUT_FORMATS = ("coco", "labelme", "cvat-xml", "via", "yolo-seg", "voc-masks", "label-images", "mask-folders")
OUTPUT_FORMATS = ("coco", "yolo-seg")

EPILOG = """\
input formats (--from FORMAT INPUT):
  labelme       a folder of LabelMe .json files; images found by their imagePath
  cvat-xml      the annotations.xml of a 'CVAT for images 1.1' export; images in ./images or --images
  via           a VGG Image Annotator 2.x project or annotation .json; the class is the region attribute
                --attribute KEY (default: the only one, or class/label/name/category/type)
  yolo-seg      an Ultralytics labels folder (dataset/labels/train); class names from data.yaml or
                classes.txt nearby (or --class-map); images from the matching images/ folder
  voc-masks     a Pascal VOC folder with SegmentationObject/, SegmentationClass/, JPEGImages/ (--split NAME)
  label-images  a folder of instance label PNG/TIFFs (0 = background) with --images DIR of the photos;
                classes: --class NAME (default 'object'), --class-map VALUES, or --class-images DIR
  mask-folders  a folder of per-image folders, ID/images/ID.png and one binary PNG per object in
                ID/masks/ (2018 Data Science Bowl, matterport's nucleus sample); one class:
                --class NAME (default 'object'); --images DIR where the photos were moved as ID.png
  coco          a COCO .json file (with --to yolo-seg)

Polygon formats stay polygons (--rle stores masks instead); VOC masks, label images and mask
folders become RLE masks, exact to the pixel. Category ids: 1..N in sorted name order, or in the order of --class-map;
YOLO and VOC keep their class numbers. What cannot be converted is counted in one warning line per
input file. Check the result with: maskrcnn check-dataset OUT.json:IMAGE_DIR
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the convert command's options."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("input", metavar="INPUT", help="the annotations to convert (a file or folder; see below)")
    p.add_argument("--from", dest="fmt", required=True, choices=INPUT_FORMATS, metavar="FORMAT",
                   help=f"the input format: {', '.join(INPUT_FORMATS)}")
    p.add_argument("--to", default="coco", choices=OUTPUT_FORMATS, metavar="FORMAT",
                   help="the output format: coco (default) or yolo-seg (labels/ and data.yaml in the --out folder)")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="the COCO .json file to write (with --to yolo-seg: a folder)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="the image folder (default: where the format keeps them); COCO file names are relative to it")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--class-map", default=None, metavar="FILE",
                         help="class names: .txt (one a line, or VALUE NAME), .yaml (a list, a mapping or a "
                              "data.yaml), .json or .csv; ids follow its order, and labels outside it are skipped")
    classes.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                         help="put every object in this one class")
    p.add_argument("--class-images", default=None, metavar="DIR",
                   help="label-images: a folder of class-label images, one per label image (same name)")
    p.add_argument("--attribute", default=None, metavar="KEY", help="via: the region attribute that names the class")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="voc-masks: convert the images of ImageSets/Segmentation/NAME.txt only")
    p.add_argument("--rle", action="store_true", help="store polygon formats' masks as RLE instead of polygons")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that do not apply to the chosen formats (a silent no-op would mislead)."""
    only = {"class_images": ("--class-images", "label-images"), "attribute": ("--attribute", "via"),
            "split": ("--split", "voc-masks")}
    for dest, (flag, fmt) in only.items():
        if getattr(args, dest) is not None and args.fmt != fmt:
            raise UserError(f"{flag} applies to --from {fmt} only")
    if args.fmt == "coco" and args.to == "coco":
        raise UserError("the input is COCO already; convert it --to yolo-seg, or clean it with maskrcnn check-dataset --fix")
    if args.fmt == "coco" and (args.class_map or args.class_name or args.rle):
        raise UserError("--class-map, --class and --rle do not apply to --from coco (its categories are kept)")
    if args.to == "yolo-seg" and args.rle:
        raise UserError("--rle does not apply to --to yolo-seg (YOLO stores polygons)")


def run(args: argparse.Namespace) -> int:
    """Convert, write the result atomically and print how to check and use it."""
    _check_options(args)
    from maskrcnn.data.convert import Options, read_annotations, write_coco

    source, out = Path(args.input), Path(args.out)
    if args.to == "coco":
        if out.is_dir():
            raise UserError(f"--out '{out}' is a folder; give the .json file to write")
        if out.exists() and source.exists() and out.resolve() == source.resolve():
            raise UserError(f"--out '{out}' is the input; write the COCO file to a new path")
    elif out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; --to yolo-seg writes a folder (labels/ and data.yaml)")
    options = Options(
        images=Path(args.images) if args.images else None,
        class_map=Path(args.class_map) if args.class_map else None,
        class_name=args.class_name,
        class_images=Path(args.class_images) if args.class_images else None,
        attribute=args.attribute, split=args.split, rle=args.rle,
    )
    if options.images is not None and not options.images.is_dir():
        raise UserError(f"--images '{options.images}' is not a folder; give the folder holding the images")
    data, image_dir, builder = read_annotations(args.fmt, source, options)
    counts = (f"{_plural(len(data['images']), 'image')}, {_plural(len(data['annotations']), 'annotation')}, "
              f"{_plural(len(data['categories']), 'category', 'categories')}")
    skipped = ""
    if builder is not None and (builder.skipped_objects or builder.skipped_images):
        skipped = (f"; skipped {_plural(builder.skipped_objects, builder.noun[:-1])} and "
                   f"{_plural(builder.skipped_images, 'image')} (warnings above)")
    if args.to == "coco":
        write_coco(data, out)
        print(f"wrote {out}: {counts}{skipped}")
        print(f"check it: maskrcnn check-dataset {out}:{image_dir}")
        print(f"train on it: data.train=[{out}:{image_dir}]")
        return 0
    from maskrcnn.data.convert import yolo

    files, lines = yolo.write(data, out, str(source))
    print(f"wrote {_plural(files, 'label file')} ({_plural(lines, 'object')}) to {out / 'labels'} and {out / 'data.yaml'} "
          f"from {counts}{skipped}")
    print(f"put the images under {out / 'images'} with the same relative paths (images from {image_dir})")
    return 0


def _plural(n: int, word: str, plural: str = "") -> str:
    """Return '1 image' or '3 images'."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"
