"""`maskrcnn make-shapes`: write a synthetic dataset (basic or fine shapes, soft blobs, or stick figures)."""

from __future__ import annotations

import argparse
import time

from maskrcnn.errors import UserError

HELP = ("Write a synthetic COCO-format dataset of squares, circles and triangles (--style fine: thin rings, "
        "crosses and stars; --style blobs: soft-edged nuclei; --keypoints: stick figures with keypoints).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this command's options to `p`."""
    p.add_argument("--out", required=True, help="output directory (gets train/, val/, train.json, val.json)")
    p.add_argument("--train", type=int, default=500, help="number of training images (default 500)")
    p.add_argument("--val", type=int, default=100, help="number of validation images (default 100)")
    p.add_argument("--test", type=int, default=0,
                   help="number of test images, a split drawn from its own random stream (default 0: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same dataset")
    p.add_argument("--size", type=int, default=None,
                   help="fixed square image side in pixels (default: each side random in 160..256; blobs 512)")
    p.add_argument("--max-shapes", type=int, default=None,
                   help="at most this many shapes (or figures) per image (default 4, with --keypoints 3, with "
                        "--style blobs 45: blobs images try at least 20, or this many if fewer)")
    # No `choices=`: the style names live with numpy's drawing code, not imported for --help; an unknown
    # style is a one-line error from make_shapes before anything is written.
    p.add_argument("--style", default="basic", metavar="STYLE",
                   help="basic: squares, circles, triangles (default); fine: small rings, crosses and stars with "
                        "thin parts and sharp corners, where a pixel of RoI misalignment costs mask AP (RoIAlign "
                        "vs RoIPool); blobs: 20 to 45 soft-edged, nucleus-like ellipses per 512-px grey image on a "
                        "dark noisy background, like fluorescence microscopy (train with --config blobs)")
    p.add_argument("--keypoints", action="store_true",
                   help="write stick figures with COCO's 17 person keypoints instead (train with --config figures)")


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print the data specs to train and evaluate on it."""
    from maskrcnn.data.shapes import make_shapes

    start = time.perf_counter()
    extra = ""
    if args.keypoints and args.style != "basic":
        raise UserError("--style chooses the shapes; it does not apply to --keypoints")
    if args.keypoints:
        from maskrcnn.data.figures import make_figures

        splits = make_figures(args.out, args.train, args.val, seed=args.seed,
                              image_size=(160, 256) if args.size is None else args.size,
                              max_figures=3 if args.max_shapes is None else args.max_shapes, num_test=args.test)
    else:
        splits = make_shapes(args.out, args.train, args.val, seed=args.seed, image_size=args.size,
                             max_shapes=args.max_shapes, style=args.style, num_test=args.test)
        # The blobs preset names its one class itself; the shapes preset needs other styles' names.
        extra = "" if args.style == "blobs" else _class_overrides(args.style)
    test = f" and {args.test} test" if "test" in splits else ""
    print(f"wrote {args.train} train, {args.val} val{test} images to {args.out} in {time.perf_counter() - start:.1f}s")
    (train_json, train_dir), (val_json, val_dir) = splits["train"], splits["val"]
    preset = "--config figures " if args.keypoints else "--config blobs " if args.style == "blobs" else ""
    print(f"use: {preset}data.train=[{train_json}:{train_dir}] data.val={val_json}:{val_dir}{extra}")
    return 0


def _class_overrides(style: str) -> str:
    """Return the overrides that name a style's classes for a model built for the basic shapes' (as `shapes` is)."""
    from maskrcnn.data.shapes import shape_categories

    names = [c["name"] for c in shape_categories(style)]
    basic = [c["name"] for c in shape_categories("basic")]
    extra = f" model.num_classes={len(names)}" if len(names) != len(basic) else ""
    return extra + (f" model.class_names=[{','.join(names)}]" if names != basic else "")
