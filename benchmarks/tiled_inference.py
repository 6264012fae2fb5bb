"""Tiled inference on large images: box/mask AP and peak memory with and without `test.tiling`.

The test set: square canvases (default 2000x2000) composed of a grid of cells, each cell one image of
the `shapes` generator at its training size (250 px: inside the 160..256 px the training images have),
so every object is at the scale the model was trained at. Objects never cross a cell border, but the
tiles do not line up with the cells, so tile borders still cut objects. The cells' backgrounds do not
join up: the canvas shows a faint grid (an artefact of composing, documented in BENCHMARKS.md).

    .venv/bin/python benchmarks/tiled_inference.py make-data --out runs/tiled-data [--images 5]
    .venv/bin/python benchmarks/tiled_inference.py measure --data runs/tiled-data --weights CKPT \\
        [--tile-sizes 208 256] [--overlap 0.25] [KEY=VALUE ...]

`measure` runs `maskrcnn eval` (AP) and `maskrcnn predict` (overlays and predictions.json at score 0.5:
what inference alone holds in memory) once without tiling and once per tile size, each in its own
process under /usr/bin/time -v (peak RSS), and prints a Markdown table. `memory` predicts one image
the same ways (e.g. with `model.box_head.score_thresh=0`, so both keep detections_per_image masks).

    .venv/bin/python benchmarks/tiled_inference.py memory --image runs/tiled-data/test/000001.png \\
        --weights CKPT [--tile-sizes 208] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from maskrcnn.fileio import atomic_write_text
from maskrcnn.data.shapes import CATEGORIES, mask_annotation, render_image

CELL = 250  # px: one training-sized shapes image per cell


def compose_canvas(seed: int, index: int, cells: int) -> tuple[np.ndarray, list[dict]]:
    """Return a (cells*CELL)^2 RGB canvas and its annotations (image-sized RLE masks, no ids)."""
    side = cells * CELL
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    annotations = []
    for row in range(cells):
        for col in range(cells):
            rng = np.random.default_rng([seed, index, row, col])
            pixels, shapes = render_image(rng, CELL, CELL)
            y0, x0 = row * CELL, col * CELL
            canvas[y0:y0 + CELL, x0:x0 + CELL] = pixels
            for category_id, mask in shapes:
                full = np.zeros((side, side), dtype=bool)  # one image-sized mask at a time
                full[y0:y0 + CELL, x0:x0 + CELL] = mask
                annotations.append(mask_annotation(full, category_id))
    return canvas, annotations


def make_data(out: Path, images: int, cells: int, seed: int) -> None:
    """Write `images` canvases and test.json (COCO) under `out`."""
    image_dir = out / "test"
    image_dir.mkdir(parents=True, exist_ok=True)
    coco_images, coco_annotations = [], []
    for index in range(images):
        pixels, annotations = compose_canvas(seed, index, cells)
        image_id = index + 1
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / name, compress_level=1)
        coco_images.append({"id": image_id, "file_name": name, "width": pixels.shape[1], "height": pixels.shape[0]})
        for ann in annotations:
            coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": image_id, **ann})
        print(f"{name}: {len(annotations)} objects", flush=True)
    data = {"info": {"description": f"shapes canvases {cells}x{cells} cells of {CELL} px, seed {seed}"},
            "images": coco_images, "annotations": coco_annotations, "categories": CATEGORIES}
    atomic_write_text(out / "test.json", json.dumps(data, separators=(",", ":")))


def timed(command: list[str]) -> tuple[float, float]:
    """Run a command under /usr/bin/time -v; return (peak RSS in MiB, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return rss_kb / 1024, seconds


def measure(args: argparse.Namespace) -> None:
    """Evaluate (AP) and predict (memory) without tiling and at each tile size; print the table."""
    data, runs = Path(args.data), Path(args.out)
    cli = [sys.executable, "-m", "maskrcnn.cli"]
    rows = [("no tiling (resized to the test size)", [])]
    for tile in args.tile_sizes:
        rows.append((f"tiles of {tile} px, overlap {args.overlap}",
                     ["test.tiling.enabled=true", f"test.tiling.tile_size={tile}", f"test.tiling.overlap={args.overlap}"]))
    print(f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"overrides {' '.join(args.opts) or '(none)'}")
    print("| inference | box AP | mask AP | box AP50 | mask AP50 | eval peak RSS MiB | eval s "
          "| predict peak RSS MiB | predict s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, (name, overrides) in enumerate(rows):
        opts = [*args.opts, *overrides]
        out = runs / f"eval{i}"
        eval_rss, eval_s = timed([*cli, "eval", "--weights", args.weights, "--data",
                                  f"{data / 'test.json'}:{data / 'test'}", "--out", str(out), "--device", "cpu", *opts])
        metrics = json.loads((out / "metrics.json").read_text())
        predict_rss, predict_s = timed([*cli, "predict", str(data / "test"), *opts, "--weights", args.weights,
                                        "--out", str(runs / f"predict{i}"), "--score-threshold", "0.5"])
        box, mask = metrics["bbox"], metrics.get("segm", {})
        print(f"| {name} | {box['AP']:.1f} | {mask.get('AP', float('nan')):.1f} | {box['AP50']:.1f} | "
              f"{mask.get('AP50', float('nan')):.1f} | {eval_rss:.0f} | {eval_s:.0f} | {predict_rss:.0f} | "
              f"{predict_s:.0f} |", flush=True)


def memory(args: argparse.Namespace) -> None:
    """Predict one image without tiling and at each tile size; print peak RSS and the detections written."""
    cli = [sys.executable, "-m", "maskrcnn.cli"]
    runs = Path(args.out)
    print(f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{args.image}, overrides {' '.join(args.opts) or '(none)'}")
    print("| inference | detections | peak RSS MiB | wall s |")
    print("| --- | ---: | ---: | ---: |")
    settings = [("no tiling", [])] + [(f"tiles of {tile} px", ["test.tiling.enabled=true", f"test.tiling.tile_size={tile}"])
                                     for tile in args.tile_sizes]
    for i, (name, overrides) in enumerate(settings):
        out = runs / f"memory{i}"
        rss, seconds = timed([*cli, "predict", args.image, *args.opts, *overrides, "--weights", args.weights,
                              "--out", str(out), "--score-threshold", "0"])
        detections = len(json.loads((out / "predictions.json").read_text()))
        print(f"| {name} | {detections} | {rss:.0f} | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-data", help="write the canvases and test.json")
    make.add_argument("--out", required=True)
    make.add_argument("--images", type=int, default=5)
    make.add_argument("--cells", type=int, default=8, help="cells per side (8: a 2000x2000 canvas)")
    make.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("measure", help="eval without and with tiling; print the table")
    run.add_argument("--data", required=True)
    run.add_argument("--weights", required=True)
    run.add_argument("--out", default="runs/tiled-bench")
    run.add_argument("--tile-sizes", type=int, nargs="+", default=[208, 256])
    run.add_argument("--overlap", type=float, default=0.25)
    run.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    mem = sub.add_parser("memory", help="predict one image without and with tiling; print peak RSS")
    mem.add_argument("--image", required=True)
    mem.add_argument("--weights", required=True)
    mem.add_argument("--out", default="runs/tiled-memory")
    mem.add_argument("--tile-sizes", type=int, nargs="+", default=[208])
    mem.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()
    if args.command == "make-data":
        make_data(Path(args.out), args.images, args.cells, args.seed)
    elif args.command == "memory":
        memory(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
