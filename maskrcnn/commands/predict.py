"""`maskrcnn predict`: run a model over image files, folders or globs; write overlays and COCO results."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskrcnn.commands.options import (DEFAULT_MODEL_HELP, add_backend_option, add_device_option, add_model_options,
                                      load_backend)
from maskrcnn.commands.options import backend_precision  # noqa: F401  (maskrcnn.commands.eval imports it from here)
from maskrcnn.errors import ImageReadError, UserError

if TYPE_CHECKING:
    import numpy as np

    from maskrcnn.engine.detections_log import DetectionsLog

HELP = "Detect and segment objects in images; write overlay PNGs and predictions.json (COCO results)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the predict command's arguments."""
    p.add_argument("inputs", nargs="+",
                   help="image or video files, folders or glob patterns (and KEY=VALUE overrides)")
    add_model_options(p, onnx=True, default_weights=DEFAULT_MODEL_HELP)
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    add_device_option(p)
    add_backend_option(p)
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="videos: run on every N-th frame only (default: 1, every frame)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same inputs and --out: skip the images already in "
                        "OUT/predictions.jsonl (videos run again)")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Return (inputs, KEY=VALUE overrides): an item is an override if it has '=' and is not a path."""
    inputs, overrides = [], []
    for item in items:
        is_override = "=" in item and not os.path.exists(item) and not glob.has_magic(item.split("=")[0])
        (overrides if is_override else inputs).append(item)
    return inputs, overrides


def expand_inputs(items: list[str]) -> list[Path]:
    """Return the image files named by paths, folders (their image files, sorted) and glob patterns.

    Names that match nothing are returned as they are, so they are reported as missing later.
    """
    from maskrcnn.data.image_io import IMAGE_SUFFIXES  # numpy and torch: imported here, not when the parser is built
    from maskrcnn.video import VIDEO_SUFFIXES

    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"no file matches '{item}'")
            files.extend(m for m in matches if m.is_file())
        else:
            files.append(path)
    return files


def overlay_name(path: Path, used: set[str]) -> str:
    """Return a unique overlay file name for an input image."""
    name, n = f"{path.stem}.png", 2
    while name in used:
        name, n = f"{path.stem}_{n}.png", n + 1
    used.add(name)
    return name


def predict_and_draw(model: Any, image: np.ndarray, overlay: Path, score_threshold: float) -> dict[str, Any]:
    """Return the model's detections of one HxWx3 image (tensors on the CPU); write their overlay PNG to `overlay`."""
    from maskrcnn.data.image_io import image_to_tensor
    from maskrcnn.fileio import atomic_path
    from maskrcnn.structures.detections import detections_to_cpu
    from maskrcnn.visualize import draw_instances

    output = detections_to_cpu(model.predict(image_to_tensor(image), score_threshold=score_threshold)[0])
    with atomic_path(overlay) as tmp:
        draw_instances(image, output, model.class_names, score_threshold).save(tmp, format="PNG")
    return output


def predict_videos(model, videos: list[Path], out: Path, score_threshold: float, every: int,
                   ids: list[int]) -> list[Path]:
    """Run the model over each video (annotated .mp4 + .jsonl per video); return those that failed."""
    from maskrcnn.video import predict_video

    failed = []
    for path in videos:
        try:
            summary = predict_video(model, path, out, score_threshold, every, ids)
        except UserError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed.append(path)
            continue
        print(f"{path}: {summary['frames']} frame(s) in {summary['seconds']:.1f} s ({summary['fps']:.2f} frames/s); "
              f"wrote {summary['video']} and {summary['jsonl']}")
    return failed


def resumed_images(log: DetectionsLog, files: list[Path]) -> set[int]:
    """Return the image ids (1-based input positions) the log already holds, checking it matches `files`."""
    done: set[int] = set()
    for entry in log.entries:
        image_id, name = entry.key["image_id"], entry.key["file_name"]
        if not (isinstance(image_id, int) and 1 <= image_id <= len(files) and str(files[image_id - 1]) == name):
            raise UserError(f"'{log.path}' holds detections of '{name}' as image {image_id}, which these inputs do "
                            "not match; resume with the same inputs as the interrupted run, or drop --resume")
        if image_id in done:
            raise UserError(f"'{log.path}' holds image {image_id} ('{name}') twice; drop --resume to start over")
        done.add(image_id)
    return done


def run(args: argparse.Namespace) -> int:
    """Predict every image; a bad image is reported and skipped; exit 1 if any failed.

    Each image's detections go to OUT/predictions.jsonl as soon as it is done (see
    maskrcnn.engine.detections_log); predictions.json is assembled from that file at the end.
    """
    from tqdm import tqdm

    from maskrcnn.api import category_ids
    from maskrcnn.data.image_io import read_image
    from maskrcnn.engine.coco_results import predictions_to_coco
    from maskrcnn.engine.detections_log import DetectionsLog, write_results_json
    from maskrcnn.video import VIDEO_SUFFIXES

    items, overrides = split_overrides(args.inputs)
    files = expand_inputs(items)
    if not files:
        raise UserError("no images to predict: give image files, folders or glob patterns")
    if args.every < 1:
        raise UserError(f"--every {args.every} must be at least 1")
    model = load_backend(args, overrides)
    ids = category_ids(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    videos = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    files = [f for f in files if f not in videos]
    failed = predict_videos(model, videos, out, args.score_threshold, args.every, ids)
    if not files and videos:
        return report_failures(failed)
    used: set[str] = set()
    # Named for every input up front, so that a name does not depend on which images failed or were resumed.
    overlays = [overlay_name(path, used) for path in files]
    max_pixels = model.cfg.input.max_pixels
    with DetectionsLog(out / "predictions.jsonl", ("file_name", "image_id"), resume=args.resume) as log:
        done = resumed_images(log, files)
        if done:
            print(f"resuming: {len(done)} of {len(files)} image(s) already in {log.path}", file=sys.stderr)
        todo = [(i, path) for i, path in enumerate(files, start=1) if i not in done]
        try:
            for image_id, path in tqdm(todo, desc="predict", unit="img", disable=len(todo) < 2):
                try:
                    image = read_image(path, max_pixels=max_pixels)
                except ImageReadError as e:
                    tqdm.write(f"skipped: {e}", file=sys.stderr)
                    failed.append(path)
                    continue
                output = predict_and_draw(model, image, out / overlays[image_id - 1], args.score_threshold)
                # The log line last: an image counts as done only once its overlay is written too.
                log.append({"file_name": str(path), "image_id": image_id,
                            "detections": predictions_to_coco(output, image_id, ids)})
        except KeyboardInterrupt:
            print(f"{len(log.entries)} of {len(files)} image(s) are saved in {log.path}; "
                  "run the same command with --resume to continue", file=sys.stderr)
            raise
        # In input order whatever the order the images ran in; each detection names its file.
        entries = sorted(log.entries, key=lambda e: e.key["image_id"])
        write_results_json(out / "predictions.json", ([{**d, "file_name": r["file_name"]} for d in r["detections"]]
                                                      for r in log.read(entries)))
    detections = sum(e.num_detections for e in entries)
    print(f"predicted {len(entries)} image(s), {detections} detection(s); overlays, predictions.json and "
          f"predictions.jsonl in {out}")
    return report_failures(failed)


def report_failures(failed: list[Path]) -> int:
    """Print the one-line summary of the inputs that failed (each was reported already); return the exit status."""
    if not failed:
        return 0
    shown = ", ".join(str(f) for f in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    print(f"{len(failed)} image(s) failed (each reported above): {shown}", file=sys.stderr)
    return 1
