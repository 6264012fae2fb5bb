"""Where OpenVINO FP32 saves time against our PyTorch FP32 path, part by part of the model.

One R50-FPN (torchvision's layout, the seeded random weights of onnxruntime_vs_pytorch.py), one 800x1067
image. PyTorch: wall time of each part, taken by forward hooks on its modules (the model's own remainder,
i.e. pre-processing, anchors, proposal selection, NMS, box decoding and mask pasting, is "the rest").
OpenVINO: its own per-layer timer (`PERF_COUNT`), each executed layer assigned to a part by its name
(the exported graph keeps the module paths) or type; layers of no part (pre-processing, proposal
selection, NMS, decoding, layout reorders) are "the rest"; the mask pasting both paths share is timed
apart. Medians over `--runs` runs after one warm-up, both in this process, alternating.

    .venv/bin/python benchmarks/op_by_op.py [--runs 3] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from onnxruntime_vs_pytorch import SIZES, model_pair  # noqa: E402

from maskrcnn.export import export_onnx  # noqa: E402
from maskrcnn.onnx_model import OnnxMaskRCNN  # noqa: E402
from maskrcnn.structures import paste_masks  # noqa: E402

# Part name -> our modules (PyTorch) and the exported graph's name prefixes / OpenVINO layer types.
PARTS = {
    # The trunk's stages are called one by one by the backbone, so the PyTorch side times the whole backbone
    # and takes the FPN off (pytorch_parts).
    "ResNet-50 trunk": (["backbone"], ["/backbone/"], []),
    "FPN": (["backbone.fpn"], ["/backbone/fpn/"], []),
    "RPN head (3x3 conv, objectness, deltas)": (["rpn.head"], ["/head/"], []),
    "RoIAlign (box and mask)": (["roi_heads.box_pooler", "roi_heads.mask_pooler"], [], ["ROIAlign"]),
    "box head fc6/fc7 + predictor": (["roi_heads.box_head", "roi_heads.box_predictor"],
                                     ["/box_head/", "/box_predictor/"], []),
    "mask head (4 convs, deconv, predictor)": (["roi_heads.mask_head"], ["/mask_head/"], ["ConvolutionBackpropData"]),
}
REST = "the rest (pre-processing, proposals, NMS, decoding, layout)"
PASTE = "mask pasting (shared)"
OVERHEAD = "OpenVINO: wall time minus its layers' timers"


def part_of_layer(name: str, layer_type: str) -> str:
    """Return the part an OpenVINO layer belongs to: the longest matching name prefix, else its type, else REST."""
    best, length = REST, 0
    for part, (_, prefixes, types) in PARTS.items():
        for prefix in prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = part, len(prefix)
        if not length and layer_type in types:
            best = part
    return best


def pytorch_parts(model: torch.nn.Module, image: torch.Tensor) -> dict[str, float]:
    """Return the seconds of each part in one PyTorch FP32 forward (hooks), the rest, and the total."""
    modules = dict(model.named_modules())
    seconds: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    handles = []
    for part, (names, _, _) in PARTS.items():
        for name in names:
            module = modules[name]
            handles.append(module.register_forward_pre_hook(
                lambda m, args: started.__setitem__(id(m), time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, args, out, part=part: seconds.__setitem__(
                    part, seconds[part] + time.perf_counter() - started[id(m)])))
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            model([image])
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    seconds["ResNet-50 trunk"] -= seconds["FPN"]  # timed as the whole backbone
    seconds[REST] = total - sum(seconds.values())
    seconds["total"] = total
    return dict(seconds)


def openvino_parts(exported: OnnxMaskRCNN, image: torch.Tensor) -> dict[str, float]:
    """Return the seconds of each part in one OpenVINO FP32 run (its per-layer timer), pasting, and the total."""
    start = time.perf_counter()
    request = exported.runner.compiled.create_infer_request() if not hasattr(exported, "_request") else exported._request
    exported._request = request
    outputs = request.infer({"image": image.numpy()})
    raw = {o.get_any_name(): torch.from_numpy(v) for o, v in outputs.items()}
    paste_start = time.perf_counter()
    paste_masks(raw["mask_probs"], raw["boxes"], *image.shape[-2:], exported.cfg.model.mask_head.threshold)
    end = time.perf_counter()
    seconds: dict[str, float] = defaultdict(float)
    for layer in request.get_profiling_info():
        seconds[part_of_layer(layer.node_name, layer.node_type)] += layer.real_time.total_seconds()
    seconds[OVERHEAD] = (paste_start - start) - sum(seconds.values())  # time outside every layer's timer
    seconds[PASTE] = end - paste_start
    seconds["total"] = end - start
    return dict(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    name = "torchvision-r50-fpn"
    model, _ = model_pair(name)
    image = torch.rand(3, *SIZES[name], generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / f"{name}.onnx")
        exported = OnnxMaskRCNN(path, threads=torch.get_num_threads(), backend="openvino", precision="fp32")
        # Recompile with the per-layer timer on (it costs a little time in every layer).
        import openvino

        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        exported.runner.compiled = openvino.Core().compile_model(exported.runner.model, "CPU", config)
        runs: dict[str, list[dict[str, float]]] = {"PyTorch": [], "OpenVINO": []}
        for i in range(args.runs + 1):
            ours, theirs = pytorch_parts(model, image), openvino_parts(exported, image)
            if i:  # the first is the warm-up
                runs["PyTorch"].append(ours)
                runs["OpenVINO"].append(theirs)
    median = {backend: {key: statistics.median(r.get(key, 0.0) for r in rs) for key in {k for r in rs for k in r}}
              for backend, rs in runs.items()}
    lines = [f"R50-FPN, one {SIZES[name][0]}x{SIZES[name][1]} image, FP32, {torch.get_num_threads()} threads, "
             f"medians of {args.runs}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| part | PyTorch s | OpenVINO s | saved s |", "|---|---|---|---|"]
    for part in [*PARTS, REST, OVERHEAD, PASTE, "total"]:
        ours, theirs = median["PyTorch"].get(part, 0.0), median["OpenVINO"].get(part, 0.0)
        label = f"{part} (PyTorch: inside the rest)" if part == PASTE else part
        if part == OVERHEAD:
            lines.append(f"| {label} | – | {theirs:+.3f} | – |")
            continue
        lines.append(f"| {label} | {ours:.3f} | {theirs:.3f} | {ours - theirs:+.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
