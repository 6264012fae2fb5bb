"""Time our Mask R-CNN against torchvision's on the same weights and image, side by side.

Both models get the same seeded `maskrcnn_resnet50_fpn` weights (classifier scaled so that 100
detections survive, as with a trained model). Runs alternate between the implementations so machine
noise hits both alike; the table reports medians and the ratio. Also times mask pasting alone
(torchvision's per-mask loop against our batched version) for the same 100 detections.

    .venv/bin/python benchmarks/inference_vs_torchvision.py [--runs 5] [--size 800x1067] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn.config import load_config
from maskrcnn.modeling import build_model, import_state_dict
from maskrcnn.structures import paste_masks


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="800x1067", help="HxW of the input image")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))

    torch.manual_seed(0)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    with torch.no_grad():
        reference.roi_heads.box_predictor.cls_score.weight.mul_(0.5)
    ours = build_model(load_config("torchvision-r50-fpn"))
    ours.load_state_dict(import_state_dict(ours, reference.state_dict()), strict=False)
    image = torch.rand(3, h, w)

    def run(model, bf16: bool):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.no_grad(), ctx:
            return model([image])

    variants = {
        "torchvision fp32": lambda: run(reference, False),
        "maskrcnn fp32": lambda: run(ours, False),
        "torchvision bf16": lambda: run(reference, True),
        "maskrcnn bf16": lambda: run(ours, True),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.runs):
        for name, fn in variants.items():
            times[name].append(timed(fn))

    detections = run(ours, False)[0]
    boxes = detections["boxes"]
    probs = torch.rand(len(boxes), 1, 28, 28)
    paste = {"torchvision paste loop": [], "maskrcnn batched paste": []}
    for _ in range(args.runs):
        paste["torchvision paste loop"].append(timed(lambda: paste_masks_in_image(probs, boxes, (h, w))))
        paste["maskrcnn batched paste"].append(timed(lambda: paste_masks(probs[:, 0], boxes, h, w)))
    times.update(paste)

    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"image {h}x{w}, {len(boxes)} detections, {args.runs} runs each, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| variant | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.3f} | {min(values):.3f} | {max(values):.3f} |")
    for kind in ("fp32", "bf16"):
        print(f"ratio torchvision/maskrcnn {kind}: {medians[f'torchvision {kind}'] / medians[f'maskrcnn {kind}']:.2f}x")
    print(f"ratio paste loop/batched: {medians['torchvision paste loop'] / medians['maskrcnn batched paste']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": [h, w], "runs": args.runs, "seconds": times, "median": medians}, f, indent=2)


if __name__ == "__main__":
    main()
