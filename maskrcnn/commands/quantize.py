"""`maskrcnn quantize`: make an int8 OpenVINO model of an exported .onnx file (post-training, NNCF)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maskrcnn.commands.options import add_model_options, add_overrides
from maskrcnn.errors import UserError
from maskrcnn.quantize import DEFAULT_CALIBRATION_SIZE, ir_path  # light: NNCF and OpenVINO load on first use

HELP = ("Quantize a model to int8 for OpenVINO: maskrcnn quantize --onnx model.onnx (or --weights CHECKPOINT) "
        "--calibration IMAGES --out model-int8.xml (post-training, with NNCF; run it with --backend openvino)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the quantize command's arguments."""
    p.add_argument("--onnx", default=None, metavar="MODEL.onnx",
                   help="the file `maskrcnn export --format onnx` wrote; or give --weights instead")
    add_model_options(p)
    add_overrides(p, example="model.box_head.score_thresh=0.3",
                  note="with --weights: the model is exported first, once, into the weights cache")
    p.add_argument("--calibration", required=True, metavar="DIR_OR_ANN.json:IMAGE_DIR",
                   help="images like those the model will see (e.g. the training set): a folder, or a COCO "
                        "annotation file and its image folder")
    p.add_argument("--calibration-size", type=int, default=DEFAULT_CALIBRATION_SIZE, metavar="N",
                   help=f"how many of them to calibrate on, spread over the set (default: {DEFAULT_CALIBRATION_SIZE})")
    p.add_argument("--out", required=True, metavar="MODEL.xml",
                   help="the int8 OpenVINO IR to write (its weights go to MODEL.bin beside it)")


def _require_nncf() -> None:
    """Raise a one-line UserError unless NNCF and OpenVINO are installed."""
    import importlib.util

    missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"maskrcnn quantize needs {' and '.join(missing)}, not installed: pip install "
                        f"{' '.join(missing)} (or the deploy extra: pip install 'maskrcnn[deploy]')")


def _exported(args: argparse.Namespace) -> Path:
    """Return the cached ONNX export of the checkpoint `--weights` (and `--config`, overrides) name."""
    from maskrcnn.loading import cached_checkpoint_export
    from maskrcnn.onnx_backends import RUNNERS

    if not args.weights:
        raise UserError("maskrcnn quantize needs --onnx MODEL.onnx or --weights CHECKPOINT (a trained model: "
                        "random weights have nothing to calibrate)")
    return cached_checkpoint_export(args.config, args.weights, args.overrides, RUNNERS["openvino"].name)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, quantize, print what was written and how to run it."""
    if args.onnx and (args.weights or args.config or args.overrides):
        raise UserError("give --onnx MODEL.onnx, or --weights (with --config and overrides), not both")
    out = ir_path(args.out)  # before the calibration images are looked for: the cheaper mistake first
    _require_nncf()
    from maskrcnn.quantize import calibration_files, quantize_onnx

    images = calibration_files(args.calibration, args.calibration_size)
    onnx = Path(args.onnx) if args.onnx else _exported(args)
    print(f"calibrating on {len(images)} images of '{args.calibration}'", file=sys.stderr)
    report = quantize_onnx(onnx, images, out)
    print(report.line())
    print(f"run it: maskrcnn predict IMAGES --weights {report.path} (OpenVINO, int8); maskrcnn eval --weights "
          f"{report.path} --data ANN.json:IMAGE_DIR for its AP")
    return 0
