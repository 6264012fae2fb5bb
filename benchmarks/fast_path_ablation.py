"""What each step of the CPU fast path buys: plain → folded frozen BN → channels-last → threaded RoIAlign.

One process, the `torchvision-r50-fpn` preset with seeded torchvision weights (classifier scaled by 0.5
so 100 detections survive), one image (inference) or a batch of two (training step with random
targets, SGD); the variants run alternately so machine noise hits them alike.

    .venv/bin/python benchmarks/fast_path_ablation.py [--size 800x1067] [--runs 3] [--mode inference|train|both]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_torchvision import alternate, autocast, torchvision_model, training_step  # noqa: E402

import maskrcnn.modeling.poolers as poolers  # noqa: E402
from maskrcnn.config import load_config  # noqa: E402
from maskrcnn.engine.benchmark import random_targets  # noqa: E402
from maskrcnn.modeling import build_model, import_state_dict  # noqa: E402

# name -> (config overrides, RoIAlign in threads)
STEPS = {
    "plain (NCHW, BN after conv, one-thread RoIAlign)": (["model.channels_last=false", "model.backbone.fold_frozen_bn=false"], False),
    "+ frozen BN folded into convs": (["model.channels_last=false"], False),
    "+ channels-last": ([], False),
    "+ RoIAlign in threads (default)": ([], True),
}


def build(state: dict, overrides: list[str], train_size: int) -> torch.nn.Module:
    model = build_model(load_config("torchvision-r50-fpn", overrides + [f"input.min_size_train=[{train_size}]"]))
    model.load_state_dict(import_state_dict(model, state), strict=False)
    return model.eval()


def with_threads(fn, threaded: bool):
    def run():
        poolers.MIN_ROIS_PER_THREAD = 32 if threaded else 10**9
        return fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="800x1067")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", choices=["inference", "train", "both"], default="both")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    state = torchvision_model().state_dict()
    models = {name: build(state, overrides, min(size)) for name, (overrides, _) in STEPS.items()}
    torch.manual_seed(2)
    image = torch.rand(3, *size)
    generator = torch.Generator().manual_seed(1)
    batch = [torch.rand(3, *size, generator=generator) for _ in range(2)]
    targets = random_targets(2, size, 90, generator)
    print(f"image {size[0]}x{size[1]}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} runs")
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        if args.mode in ("inference", "both"):
            def infer(model):
                with torch.inference_mode(), autocast(bf16):
                    model([image])
            times = alternate({n: with_threads(lambda m=m: infer(m), STEPS[n][1]) for n, m in models.items()}, args.runs)
            report(f"inference {precision}, s/image", times)
        if args.mode in ("train", "both"):
            times = alternate({n: with_threads(training_step(m, batch, targets, bf16), STEPS[n][1])
                               for n, m in models.items()}, args.runs)
            report(f"training step {precision}, 2 images, s/step", times)


def report(title: str, times: dict[str, list[float]]) -> None:
    print(f"\n| {title} | median | min | vs plain |\n|---|---|---|---|")
    plain = statistics.median(next(iter(times.values())))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {plain / median:.2f}x |")


if __name__ == "__main__":
    main()
