"""RoI feature pooling: FPN level assignment, then RoIAlign or RoIPool (torchvision.ops kernels)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from maskrcnn.config import PoolerConfig
from maskrcnn.structures import box_area


def assign_levels(boxes: Tensor, min_level: int, max_level: int, canonical_size: int, canonical_level: int) -> Tensor:
    """Return each box's pyramid level index (0 = min_level): k = ⌊k0 + log2(√(wh)/224)⌋, clamped."""
    size = torch.sqrt(box_area(boxes))
    level = torch.floor(canonical_level + torch.log2(size / canonical_size) + 1e-6)
    return (level.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Return [R, 5] rows (image index, x1, y1, x2, y2) from per-image box lists."""
    indices = [torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(indices), torch.cat(boxes)], dim=1)


# torchvision's CPU RoIAlign kernels (forward and backward) run on one core. They release the GIL, so
# chunks of the RoIs handed to Python threads use the other cores: 1.7-1.9x on 2 cores, same values.
MIN_ROIS_PER_THREAD = 32
_threads: ThreadPoolExecutor | None = None


def _run_in_threads(calls: list[Callable[[], Tensor]]) -> list[Tensor]:
    """Run the calls on a pool of torch.get_num_threads() threads, without autograd; results in order."""
    global _threads
    if _threads is None or _threads._max_workers != torch.get_num_threads():
        _threads = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="roi-align")

    def run(call: Callable[[], Tensor]) -> Tensor:
        with torch.no_grad():  # grad mode is per thread: workers would otherwise record a graph
            return call()
    return list(_threads.map(run, calls))


class ThreadedRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign over chunks of the RoIs in parallel threads, forward and backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # as torchvision's autocast rule
    def forward(ctx, feature: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float,
                sampling_ratio: int, aligned: bool, chunks: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (output_size, scale, sampling_ratio, aligned, chunks, feature.shape)
        align = torch.ops.torchvision.roi_align
        return torch.cat(_run_in_threads([
            lambda part=part: align(feature, part, scale, *output_size, sampling_ratio, aligned)
            for part in rois.chunk(chunks)
        ]))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        output_size, scale, sampling_ratio, aligned, chunks, shape = ctx.args
        backward = torch.ops.torchvision._roi_align_backward
        partial_grads = _run_in_threads([
            lambda g=g, part=part: backward(g.contiguous(), part, scale, *output_size, *shape, sampling_ratio, aligned)
            for g, part in zip(grad.chunk(chunks), rois.chunk(chunks))
        ])
        return sum(partial_grads), None, None, None, None, None, None


class RoIPooler(nn.Module):
    """Pools a fixed-size feature grid for each box from the level of the pyramid that fits it."""

    def __init__(self, cfg: PoolerConfig, strides: list[int]):
        super().__init__()
        self.type = cfg.type
        self.aligned = cfg.aligned
        self.output_size = (cfg.output_size, cfg.output_size)
        self.sampling_ratio = cfg.sampling_ratio
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))
        self.canonical_size = cfg.canonical_size
        self.canonical_level = cfg.canonical_level

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.type == "roipool":
            return roi_pool(feature, rois, self.output_size, scale)
        threads = torch.get_num_threads() if feature.device.type == "cpu" else 1
        chunks = min(threads, len(rois) // MIN_ROIS_PER_THREAD)
        if chunks > 1:
            return ThreadedRoIAlign.apply(
                feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned, chunks)
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Return [R, C, S, S] pooled features for all boxes of all images, in input order."""
        rois = boxes_to_rois(boxes).to(features[0].dtype)
        if len(features) == 1:
            return self._pool(features[0], rois, self.scales[0])
        levels = assign_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_size, self.canonical_level
        )
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel():
                out[index] = self._pool(feature, rois[index], scale).to(out.dtype)
        return out
