"""`maskrcnn export`: write a model as an ONNX file (or TorchScript) for other runtimes."""

from __future__ import annotations

import argparse
import time

from maskrcnn.commands.options import add_model_options, add_overrides
from maskrcnn.errors import UserError

HELP = ("Export a model: maskrcnn export --config C --weights W --format onnx --out model.onnx "
        "(whole network incl. NMS and mask selection, any image size; run it with predict --backend onnxruntime)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the export command's arguments."""
    add_overrides(p, example="model.box_head.detections_per_image=50")
    add_model_options(p)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default: onnx)")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, at least 17 (default: 17)")
    p.add_argument("--check", action="store_true",
                   help="after writing, run the file in ONNX Runtime and compare with PyTorch on random images; exit "
                        "status 1 when they differ or neither detects anything (nothing to compare)")


def run(args: argparse.Namespace) -> int:
    """Load the model, export it, optionally check parity, print where the file is."""
    from maskrcnn.export import export_onnx
    from maskrcnn.loading import load_pytorch_model

    if args.opset < 17:
        raise UserError(f"--opset {args.opset} is too old: the export needs opset 17 or newer")
    model = load_pytorch_model(args.config, args.weights, list(args.overrides), device="cpu")
    start = time.perf_counter()
    try:
        path = export_onnx(model, args.out, opset=args.opset)
    except UserError:
        raise
    except Exception as e:  # the exporters raise many kinds; one line names the failing step
        raise UserError(f"ONNX export failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MB, opset {args.opset}, {time.perf_counter() - start:.1f} s); "
          "masks come out as [D, M, M] probabilities, pasted by the runtime wrapper")
    if args.check:
        from maskrcnn.export import check_parity

        report = check_parity(model, path)
        for line in report.lines():
            print(f"parity: {line}")
        if not report.agrees:
            return 1
    return 0
