"""`maskrcnn predict`: run a model over image files, folders or globs; write overlays and COCO results."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from maskrcnn.errors import ImageReadError, UserError

HELP = "Detect and segment objects in images; write overlay PNGs and predictions.json (COCO results)."
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the predict command's arguments."""
    p.add_argument("inputs", nargs="+",
                   help="image or video files, folders or glob patterns (and KEY=VALUE overrides)")
    p.add_argument("--config", "--preset", dest="config", default=None,
                   help="preset name or YAML file (default: the config of the --weights zoo model or checkpoint)")
    p.add_argument("--weights", default=None,
                   help="a model name from `maskrcnn models` (fetched once), our checkpoint, or a torchvision / "
                        "Detectron2 weights file (default without --config: maskrcnn_resnet50_fpn_v2, COCO)")
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_backend_argument(p)
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="videos: run on every N-th frame only (default: 1, every frame)")


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
    from maskrcnn.video import VIDEO_SUFFIXES  # numpy: imported here, not when the parser is built

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


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """`--backend pytorch|onnxruntime`, shared by predict and eval."""
    p.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="pytorch, or onnxruntime (CPU) with --weights a file from `maskrcnn export --format onnx`")


def load_backend(args: argparse.Namespace, overrides: list[str]):
    """Return the model to predict with: a PyTorch MaskRCNN, or an exported file run by ONNX Runtime.

    Given neither --weights nor --config, the default COCO model of the zoo is used (fetched once).
    """
    from maskrcnn.api import load_model, random_weights_note
    from maskrcnn.zoo import DEFAULT_MODEL

    if getattr(args, "backend", "pytorch") != "onnxruntime":
        if not args.weights and not args.config:
            print(f"no --weights or --config: using the default COCO model '{DEFAULT_MODEL}' "
                  "(`maskrcnn models` lists the others)", file=sys.stderr)
            args.weights = DEFAULT_MODEL
        random_weights_note(args.config, args.weights)
        return load_model(args.config, args.weights, overrides, device=args.device)
    from maskrcnn.export import OnnxMaskRCNN

    if not args.weights or not str(args.weights).endswith(".onnx"):
        raise UserError("--backend onnxruntime needs --weights MODEL.onnx (written by `maskrcnn export --format onnx`)")
    if args.config or overrides:
        raise UserError("--backend onnxruntime uses the config stored in the .onnx file; "
                        "drop --config and KEY=VALUE overrides (export again to change the model)")
    if args.device != "cpu":
        raise UserError("--backend onnxruntime runs on the CPU only; drop --device")
    return OnnxMaskRCNN(args.weights)


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


def run(args: argparse.Namespace) -> int:
    """Predict every image; a bad image is reported and skipped; exit 1 if any failed."""
    from tqdm import tqdm

    from maskrcnn.api import category_ids
    from maskrcnn.config import atomic_path
    from maskrcnn.data.image_io import image_to_tensor, read_image
    from maskrcnn.engine.evaluator import predictions_to_coco, write_predictions
    from maskrcnn.video import VIDEO_SUFFIXES
    from maskrcnn.visualize import draw_instances

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
    results, failed, used = [], [], set()
    failed += predict_videos(model, videos, out, args.score_threshold, args.every, ids)
    max_pixels = model.cfg.input.max_pixels
    for image_id, path in enumerate(tqdm(files, desc="predict", unit="img", disable=len(files) < 2), start=1):
        try:
            image = read_image(path, max_pixels=max_pixels)
        except ImageReadError as e:
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            failed.append(path)
            continue
        output = model.predict(image_to_tensor(image), score_threshold=args.score_threshold)[0]
        output = {k: v.cpu() if hasattr(v, "cpu") else v for k, v in output.items()}
        for r in predictions_to_coco(output, image_id, ids):
            r["file_name"] = str(path)
            results.append(r)
        overlay = draw_instances(image, output, model.class_names, args.score_threshold)
        with atomic_path(out / overlay_name(path, used)) as tmp:
            overlay.save(tmp, format="PNG")
    if files or not videos:
        write_predictions(results, out / "predictions.json")
        done = len(files) - len([f for f in failed if f not in videos])
        print(f"predicted {done} image(s), {len(results)} detection(s); overlays and predictions.json in {out}")
    if failed:
        shown = ", ".join(str(f) for f in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        print(f"{len(failed)} image(s) failed (each reported above): {shown}", file=sys.stderr)
        return 1
    return 0
