"""The compute floor of a benchmark: FLOPs counted by torch.utils.flop_counter (convolutions and matrix
products) divided by the throughput this process measures for a large 3x3 convolution in the same
precision and threads: what the work would take if every FLOP ran as fast as the CPU's best case.

Shared by train_step.py (a training step: forward and backward) and onnxruntime_vs_pytorch.py (inference).
"""

from __future__ import annotations

import time
from typing import Any, Callable


def counted_flops(work: Callable[[], Any]) -> float:
    """Return the FLOPs `work()` spends in convolutions and matrix products (it runs once)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return float(counter.get_total_flops())


def conv_throughput(dtype=None, backward: bool = True, batch: int = 8, channels: int = 128, size: int = 64,
                    channels_last: bool = False, repeats: int = 5) -> float:
    """Return FLOP/s of a 3x3 `channels`-to-`channels` convolution over `batch` maps of `size`², forward
    (and backward when `backward`), under autocast to `dtype` (None: float32)."""
    import torch

    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(batch, channels, size, size, requires_grad=backward)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(backward)

    def once() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None), \
                torch.set_grad_enabled(backward):
            y = conv(x)
        if backward:
            y.float().sum().backward()

    flops = counted_flops(once)
    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return flops * repeats / (time.perf_counter() - start)


def inference_conv_throughput(dtype=None) -> float:
    """Return the best forward FLOP/s of the two convolution shapes that dominate Mask R-CNN inference at
    800 px: a 256-channel 3x3 over a large map (FPN outputs, RPN head) and over a batch of 100 14x14 RoIs
    (mask head), both channels-last as oneDNN prefers; the best of three tries of each."""
    shapes = [dict(batch=1, channels=256, size=128), dict(batch=100, channels=256, size=14)]
    # Best of three tries of each: a best case, so one try slowed by the machine's noise must not set it.
    return max(conv_throughput(dtype, backward=False, channels_last=True, **shape) for shape in shapes for _ in range(3))
