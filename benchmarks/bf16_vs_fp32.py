"""bfloat16 autocast against float32 on this CPU: one 3x3 convolution and one training step of `shapes`.

Says whether the CPU computes bfloat16 natively (what `solver.amp=auto` decides on) and times, alternately
in one process, the same work in both precisions. On CPUs with AVX-512/AMX bf16 should win; on AVX2-only
CPUs oneDNN emulates it and it loses by a wide margin, which is why the `shapes` preset says `auto`.

    .venv/bin/python benchmarks/bf16_vs_fp32.py [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_torchvision import alternate, autocast, training_step  # noqa: E402

from maskrcnn.config import load_config  # noqa: E402
from maskrcnn.engine.benchmark import random_targets  # noqa: E402
from maskrcnn.engine.precision import native_bf16  # noqa: E402
from maskrcnn.modeling import build_model  # noqa: E402


def convolution(bf16: bool):
    """Return one forward of a 3x3 conv, 128 -> 128 channels, over 2 maps of 64x64."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1)
    x = torch.randn(2, 128, 64, 64)

    def run() -> None:
        with torch.no_grad(), autocast(bf16):
            conv(x)
    return run


def shapes_step(bf16: bool):
    """Return one SGD step of the `shapes` preset model on 4 random 128x128 images."""
    torch.manual_seed(0)
    model = build_model(load_config("shapes"))
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 128, generator=generator) for _ in range(4)]
    return training_step(model, images, random_targets(4, (128, 128), 3, generator), bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16(torch.device('cpu'))}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| work | fp32 s (median of runs) | bf16 autocast s | bf16 / fp32 |")
    print("| --- | ---: | ---: | ---: |")
    for name, make in (("3x3 conv 128->128, 2x64x64, forward", convolution),
                       ("shapes preset training step, 4 images 128x128", shapes_step)):
        times = alternate({"fp32": make(False), "bf16": make(True)}, args.runs)
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        print(f"| {name} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
