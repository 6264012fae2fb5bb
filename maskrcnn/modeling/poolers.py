"""RoI feature pooling: FPN level assignment, then RoIAlign or RoIPool (torchvision.ops kernels)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from maskrcnn.config_schema import PoolerConfig
from maskrcnn.structures.boxes import box_area


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


def _axis_taps(start: Tensor, bin_size: Tensor, bins: int, grid: int, size: int) -> tuple[Tensor, Tensor]:
    """Return, along one axis, the two pixels each RoIAlign sample reads and their weights, [R, bins, grid, 2].

    torchvision's rule: samples at (i + 0.5) / grid of each bin; a sample more than one pixel outside the
    map reads nothing; otherwise it is clamped into the map and split linearly between its two neighbours.
    """
    dtype = start.dtype
    bin_index = torch.arange(bins, dtype=dtype, device=start.device)[None, :, None]
    sample = (torch.arange(grid, dtype=dtype, device=start.device) + 0.5)[None, None, :]
    pos = start[:, None, None] + bin_index * bin_size[:, None, None] + sample * bin_size[:, None, None] / grid
    inside = ((pos >= -1.0) & (pos <= size)).to(dtype)
    pos = pos.clamp(min=0.0)
    low = pos.long()  # truncation, as the kernel's (int) cast: pos >= 0 here
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    frac = torch.where(at_edge, 0.0, pos - low.to(dtype))
    return torch.stack([low, high], dim=-1), torch.stack([(1.0 - frac) * inside, frac * inside], dim=-1)


def roi_align_backward(grad: Tensor, rois: Tensor, feature_shape: torch.Size, scale: float,
                       sampling_ratio: int, aligned: bool) -> Tensor:
    """Return RoIAlign's gradient w.r.t. its [N, C, H, W] input, for a fixed `sampling_ratio` (> 0).

    The exact adjoint of torchvision's forward: each output bin's gradient is split over the pixels its
    samples read, with the same bilinear weights. Done as a few index_adds of whole channel rows,
    instead of torchvision's CPU kernel, which recomputes the weights for every channel on one core
    (the largest single cost of a `shapes` training step after the convolutions).
    """
    n, c, h, w = feature_shape
    r, _, bins_h, bins_w = grad.shape
    grid = sampling_ratio
    out = grad.new_zeros(n * h * w, c)
    if r:
        boxes = rois[:, 1:].to(grad.dtype) * scale - (0.5 if aligned else 0.0)
        extent = boxes[:, 2:] - boxes[:, :2]
        if not aligned:
            extent = extent.clamp(min=1.0)
        rows, row_weights = _axis_taps(boxes[:, 1], extent[:, 1] / bins_h, bins_h, grid, h)
        cols, col_weights = _axis_taps(boxes[:, 0], extent[:, 0] / bins_w, bins_w, grid, w)
        # [R, bins_h, bins_w, grid_y * grid_x * 4]: flat pixel index and weight of every tap of every bin.
        first = (rois[:, 0].long() * (h * w))[:, None, None, None, None, None, None]
        index = first + rows[:, :, None, :, None, :, None] * w + cols[:, None, :, None, :, None, :]
        weight = row_weights[:, :, None, :, None, :, None] * col_weights[:, None, :, None, :, None, :] / (grid * grid)
        index, weight = index.reshape(r, bins_h, bins_w, -1), weight.reshape(r, bins_h, bins_w, -1)
        per_bin = grad.permute(0, 2, 3, 1)  # [R, bins_h, bins_w, C]: channel rows, added whole
        for tap in range(index.shape[-1]):
            out.index_add_(0, index[..., tap].reshape(-1), (per_bin * weight[..., tap, None]).reshape(-1, c))
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


class CpuRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign forward (chunks of RoIs in parallel threads); a vectorised backward.

    The backward is `roi_align_backward` for a fixed sampling ratio, and torchvision's kernel over
    chunks of RoIs in threads for the adaptive one (sampling_ratio 0, whose grid differs per RoI).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # as torchvision's autocast rule
    def forward(ctx, feature: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float,
                sampling_ratio: int, aligned: bool, chunks: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (output_size, scale, sampling_ratio, aligned, chunks, feature.shape)
        ctx.channels_last = feature.is_contiguous(memory_format=torch.channels_last) and not feature.is_contiguous()
        align = torch.ops.torchvision.roi_align
        if chunks <= 1:
            return align(feature, rois, scale, *output_size, sampling_ratio, aligned)
        return torch.cat(_run_in_threads([
            lambda part=part: align(feature, part, scale, *output_size, sampling_ratio, aligned)
            for part in rois.chunk(chunks)
        ]))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        output_size, scale, sampling_ratio, aligned, chunks, shape = ctx.args
        if sampling_ratio > 0:
            grad_feature = roi_align_backward(grad, rois, shape, scale, sampling_ratio, aligned)
            layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
            return grad_feature.contiguous(memory_format=layout), None, None, None, None, None, None
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
        if feature.device.type != "cpu":
            return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)
        chunks = min(torch.get_num_threads(), len(rois) // MIN_ROIS_PER_THREAD)
        # One thread and the adaptive grid (sampling_ratio 0): torchvision's op as it is, backward included.
        if chunks > 1 or (self.sampling_ratio > 0 and feature.requires_grad and torch.is_grad_enabled()):
            return CpuRoIAlign.apply(
                feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned, chunks)
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Return [R, C, S, S] pooled features for all boxes of all images, in input order."""
        return self.pool_rois(features, boxes_to_rois(boxes))

    def pool_rois(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """Return [R, C, S, S] pooled features for [R, 5] rows (image index, x1, y1, x2, y2)."""
        rois = rois.to(features[0].dtype)
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
