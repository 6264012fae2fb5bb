"""ONNX Runtime and OpenVINO (CPU, the file `maskrcnn export` writes) against PyTorch FP32 and BF16 autocast.

For each model: export once, then time one image end to end (input tensor → boxes, scores, labels and
pasted masks) for torchvision FP32 (torchvision's own Mask R-CNN with the same weights, for
`torchvision-r50-fpn` only), PyTorch FP32, PyTorch BF16 autocast, ONNX Runtime FP32, OpenVINO FP32, OpenVINO
BF16 (only on a CPU with native bfloat16) and OpenVINO int8 (`maskrcnn quantize`'s IR of the same file,
calibrated on `--calibration` images or, by default, on `--calibration-size` seeded random images of the
benchmark's size, as its image is; `openvino-int8-bf16` runs its float layers in bf16, an experiment;
`--backends` picks), runs interleaved so that machine noise hits all
alike, same weights. Agreement with PyTorch FP32 is counted with the parity tests' tolerances
(boxes 0.05 px, scores 1e-4, mask IoU 0.99), and with compare_torchvision.py's looser "same detection"
ones (2 px, 0.02, mask IoU 0.9) that BF16 can meet. The FLOP floor rows divide the forward's FLOPs (PyTorch
FP32, counted by torch.utils.flop_counter) by the best 3x3-convolution throughput this process measures in
FP32 (and in BF16 where the BF16 rows run): no path can beat them by more than the CPU's best case allows. Weights are random and seeded; the torchvision preset's
classifier is scaled by 0.5 so that 100 detections survive, as with a trained model.

    .venv/bin/python benchmarks/onnxruntime_vs_pytorch.py [--runs 5] [--models torchvision-r50-fpn,shapes]
        [--backends torchvision-fp32,pytorch-fp32,pytorch-bf16,onnxruntime,openvino-fp32,openvino-bf16,openvino-int8,
                    openvino-int8-bf16]
        [--calibration DIR] [--calibration-size 4] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from maskrcnn.config import load_config
from maskrcnn.engine.compare import Tolerances, agreement_summary
from maskrcnn.export import PARITY_TOLERANCES, export_onnx
from maskrcnn.onnx_model import OnnxMaskRCNN
from maskrcnn.engine.precision import native_bf16
from maskrcnn.modeling import build_model

sys.path.insert(0, str(Path(__file__).parent))
from compare_torchvision import BF16_TOLERANCES  # noqa: E402  "the same detection": boxes 2 px, scores 0.02, IoU 0.9
from compare_torchvision import our_model, torchvision_model  # noqa: E402
from flops import counted_flops, inference_conv_throughput  # noqa: E402

SIZES = {"torchvision-r50-fpn": (800, 1067), "shapes": (128, 171)}


def seeded_model(name: str):
    """Return a seeded random model of the preset, tuned so that it keeps many detections."""
    torch.manual_seed(0)
    model = build_model(load_config(name)).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.class_logits.weight.mul_(0.5 if name != "shapes" else 50.0)
        model.roi_heads.mask_head.predictor.weight.normal_(std=0.05)
        model.roi_heads.mask_head.predictor.bias.fill_(0.3)
    return model


def model_pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Return our model of the preset and, for `torchvision-r50-fpn`, torchvision's own with the same weights."""
    if name != "torchvision-r50-fpn":
        return seeded_model(name), None
    reference = torchvision_model()  # seeded; its classifier scaled as seeded_model does
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # masks with some shape, as seeded_model's
        reference.roi_heads.mask_predictor.mask_fcn_logits.weight.normal_(std=0.05)
        reference.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(0.3)
        # The FPN's and RPN head's biases as a trained model has them (torchvision initialises them to 0):
        # `maskrcnn quantize` keeps bias-less FPN outputs in float (an OpenVINO CPU plugin problem), so with
        # zeros the int8 rows would time less of the model in int8 than a trained model runs.
        for name, parameter in reference.named_parameters():
            if name.endswith(".bias") and name.startswith(("backbone.fpn.", "rpn.head.")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return our_model(reference), reference


def measure(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Return seconds per run for each call, the calls interleaved run by run."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


# --backends name: (table label, exported-file runtime or None for PyTorch, precision)
BACKENDS = {"torchvision-fp32": ("torchvision FP32", "torchvision", "fp32"),
            "pytorch-fp32": ("PyTorch FP32", None, "fp32"), "pytorch-bf16": ("PyTorch BF16 autocast", None, "bf16"),
            "onnxruntime": ("ONNX Runtime FP32", "onnxruntime", "fp32"),
            "openvino-fp32": ("OpenVINO FP32", "openvino", "fp32"), "openvino-bf16": ("OpenVINO BF16", "openvino", "bf16"),
            "openvino-int8": ("OpenVINO int8", "openvino", "int8"),
            "openvino-int8-bf16": ("OpenVINO int8, rest BF16", "openvino", "int8-bf16")}


def rest_in_bf16(runner: Any, threads: int | None) -> None:
    """Recompile an OpenVinoRunner's int8 file with OpenVINO's bf16 hint: its float32 layers (predictors, RoI
    pooling, post-processing) then run in bfloat16. An experiment, not a `--precision` of the
    command line (eval_int8_rest_bf16.py measures its AP)."""
    import openvino

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    runner.compiled = openvino.Core().compile_model(runner.model, "CPU", config)


def calibration_images(folder: Path, size: tuple[int, int], count: int, source: str | None) -> list[Path]:
    """Return the int8 row's calibration images: `count` of `source`, or `count` seeded random PNGs of `size`."""
    from PIL import Image

    from maskrcnn.quantize import calibration_files

    if source:
        return calibration_files(source, count)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):  # like the timed image (uniform noise), other seeds
        pixels = torch.rand(*size, 3, generator=torch.Generator().manual_seed(100 + i)).mul(255).to(torch.uint8)
        paths.append(folder / f"calibration{i}.png")
        Image.fromarray(pixels.numpy()).save(paths[-1])
    return paths


def bench_model(name: str, runs: int, warmup: int, threads: int, backends: list[str],
                calibration: tuple[str | None, int] = (None, 4)) -> list[dict[str, Any]]:
    """Return one row per backend for the preset `name` (PyTorch FP32 always: the reference); `calibration`:
    the int8 row's images (a folder or ANN.json:IMAGE_DIR, None for random ones) and how many."""
    model, reference_model = model_pair(name)
    size = SIZES.get(name, (800, 1067))
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / f"{name}.onnx")
        export_s = time.perf_counter() - start
        file_mb = path.stat().st_size / 2**20
        quantize_s = None

        def pytorch_fp32():
            with torch.inference_mode():
                return model([image])[0]

        def pytorch_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model([image])[0]

        calls = {"PyTorch FP32": pytorch_fp32}
        for key in backends:
            label, runtime, precision = BACKENDS[key]
            if runtime is None:
                if precision == "bf16":
                    calls[label] = pytorch_bf16
                continue
            if runtime == "torchvision":
                if reference_model is not None:  # the same weights in torchvision's own implementation
                    calls[label] = lambda: _infer(reference_model, image)
                continue
            weights = path
            if precision.startswith("int8"):
                int8_path = Path(tmp) / f"{name}-int8.xml"
                if not int8_path.exists():  # one quantized file for both int8 rows
                    from maskrcnn.quantize import quantize_onnx

                    images = calibration_images(Path(tmp) / "calibration", size, calibration[1], calibration[0])
                    report = quantize_onnx(path, images, int8_path)
                    quantize_s = report.seconds
                    print(report.line(), file=sys.stderr)
                weights = int8_path
            exported = OnnxMaskRCNN(weights, threads=threads, backend=runtime, precision=precision[:4])
            if precision == "int8-bf16":
                rest_in_bf16(exported.runner, threads)
            calls[label] = lambda exported=exported: exported([image])[0]
        reference = pytorch_fp32()
        outputs = {label: call() for label, call in calls.items()}
        times = measure(calls, runs, warmup)
    rows = []
    base = statistics.median(times["PyTorch FP32"])
    torchvision_s = statistics.median(times["torchvision FP32"]) if "torchvision FP32" in times else None
    for label, values in times.items():
        agree = agreement_summary(reference, outputs[label], Tolerances(**PARITY_TOLERANCES))
        same = agreement_summary(reference, outputs[label], BF16_TOLERANCES)
        rows.append({"model": name, "size": f"{size[0]}x{size[1]}", "backend": label,
                     "median_s": statistics.median(values), "min_s": min(values),
                     "speed_vs_fp32": base / statistics.median(values),
                     "speed_vs_torchvision": torchvision_s / statistics.median(values) if torchvision_s else None,
                     "detections": agree["actual"], "agree_with_fp32": f"{agree['matched']}/{agree['expected']}",
                     "same_detections": f"{same['matched']}/{same['expected']}",
                     "export_s": export_s if not label.startswith("PyTorch") else None,
                     "file_mb": file_mb if not label.startswith("PyTorch") else None,
                     "quantize_s": quantize_s if label.startswith("OpenVINO int8") else None,
                     "calibration_images": calibration[1] if label.startswith("OpenVINO int8") else None})
    flops = counted_flops(pytorch_fp32)
    floors = {"FP32": None} | ({"BF16": torch.bfloat16} if "PyTorch BF16 autocast" in times else {})
    for precision, dtype in floors.items():
        throughput = inference_conv_throughput(dtype)
        floor_s = flops / throughput
        rows.append({"model": name, "size": f"{size[0]}x{size[1]}", "median_s": floor_s, "min_s": None,
                     "backend": f"FLOP floor, {precision} ({flops / 1e9:.0f} GFLOP at {throughput / 1e9:.0f} GFLOP/s)",
                     "speed_vs_fp32": base / floor_s, "speed_vs_torchvision": torchvision_s / floor_s if torchvision_s else None,
                     "detections": None, "agree_with_fp32": "–", "same_detections": "–", "export_s": None,
                     "file_mb": None, "gflop": flops / 1e9, "conv_gflops": throughput / 1e9})
    return rows


def _infer(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model([image])[0]


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "–"


def environment(threads: int) -> dict[str, Any]:
    """Return the versions and machine the numbers were taken on."""
    import importlib.metadata

    import onnxruntime
    import openvino

    try:
        nncf = importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        nncf = "not installed"
    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__.split("-")[0], "nncf": nncf,
            "cpu": platform.processor() or platform.machine(), "threads": threads,
            "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], runs: int) -> str:
    """Return the result table as Markdown."""
    lines = [f"Measured {env['date']}: torch {env['torch']}, onnxruntime {env['onnxruntime']}, openvino "
             f"{env['openvino']}, nncf {env['nncf']}, {env['threads']} threads, median of {runs} runs (one image, input tensor to pasted "
             f"masks), load average {env['load_average']} at the end.", "",
             "| model | image | backend | median s | min s | vs PyTorch FP32 | vs torchvision FP32 | detections | "
             "agree with FP32 | same detection (2 px, 0.02, IoU 0.9) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        min_s = f"{r['min_s']:.3f}" if r["min_s"] is not None else "–"
        detections = r["detections"] if r["detections"] is not None else "–"
        lines.append(f"| {r['model']} | {r['size']} | {r['backend']} | {r['median_s']:.3f} | {min_s} | "
                     f"{r['speed_vs_fp32']:.2f}x | {_ratio(r['speed_vs_torchvision'])} | {detections} | {r['agree_with_fp32']} | {r['same_detections']} |")
    exports = list({r["model"]: r for r in rows if r["export_s"] is not None}.values())  # one per model
    lines.append("")
    lines.extend(f"- {r['model']}: export {r['export_s']:.1f} s, file {r['file_mb']:.1f} MB" for r in exports)
    int8 = list({r["model"]: r for r in rows if r.get("quantize_s") is not None}.values())  # one per model
    lines.extend(f"- {r['model']}: int8 quantization {r['quantize_s']:.1f} s on {r['calibration_images']} calibration "
                 "images" for r in int8)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="torchvision-r50-fpn,shapes", help="comma-separated presets")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)} (PyTorch FP32 always runs: the reference)")
    parser.add_argument("--calibration", default=None, metavar="DIR_OR_ANN.json:IMAGE_DIR",
                        help="the int8 row's calibration images (default: seeded random images like the timed one)")
    parser.add_argument("--calibration-size", type=int, default=4, help="how many calibration images (default: 4)")
    parser.add_argument("--json", default=None, help="write the rows and environment as JSON here")
    parser.add_argument("--markdown", default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if not native_bf16(torch.device("cpu")):
        print("no native bfloat16 on this CPU: skipping the BF16 rows", file=sys.stderr)
        backends = [b for b in backends if not BACKENDS[b][2].endswith("bf16")]
    rows = [row for name in args.models.split(",")
            for row in bench_model(name, args.runs, args.warmup, threads, backends,
                                   (args.calibration, args.calibration_size))]
    env = environment(threads)
    table = markdown(rows, env, args.runs)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
