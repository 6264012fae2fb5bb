"""Ground-truth instance masks kept as tight per-instance crops: memory grows with the objects, not the image.

A dense [N, H, W] tensor costs N x H x W bytes: 5 000 small objects in a 1024 x 1024 image are 5 GB
before anything is resized or converted to float. `InstanceMasks` keeps each instance as the bitmap of
its own bounding rectangle (its *region*: top, left, height, width in image pixels), all crops packed
one after another in one flat uint8 buffer, plus the image size. Every operation the training path needs
(flips, quarter turns, crops, the model's resize, tight boxes, areas, per-RoI mask targets) works on the
crops and gives exactly the pixels the same operation on the dense tensor would give; the tests compare
them pixel for pixel.

Each geometric operation is one gather: it says where each instance's new region lies and, for every
pixel of the new crops, which pixel of the old crops it copies (`_remap`). No Python loop over instances,
so an image with thousands of objects costs a few vectorised passes over its crops' pixels.

`as_instance_masks` is the one place that accepts either form: the dataset produces `InstanceMasks`,
while the model and the transforms also take today's dense [N, H, W] tensors (torchvision-style targets)
and convert them there.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# Pixel (i, r, c) of the new crops -> flat index into the old buffer.
SourceIndex = Callable[[Tensor, Tensor, Tensor], Tensor]


class InstanceMasks:
    """Binary masks of N instances in an H x W image, each stored as the crop of its region.

    `regions` is int64 [N, 4]: (top, left, height, width) of each crop in image pixels, inside the image;
    `pixels` holds the crops row by row, instance after instance (uint8 0/1, sum of height x width values).
    A crop may be empty (height or width 0) or hold zero rows/columns at its edges (after a resize that
    skips source rows); `boxes()` always gives the tight box of what is set.

    It reads like the dense tensor where that is cheap: `len(m)`, `m.shape` = (N, H, W), `m[i]` one mask
    as a bool H x W array (as `RLEMasks` gives), `m[index]` (bool mask, index tensor or list, slice) a
    subset; `to_dense()` builds the [N, H, W] tensor (for drawing and tests, not for the training path).
    """

    def __init__(self, pixels: Tensor, regions: Tensor, height: int, width: int):
        regions = torch.as_tensor(regions, dtype=torch.int64).reshape(-1, 4)
        pixels = torch.as_tensor(pixels).reshape(-1).to(torch.uint8)
        sizes = regions[:, 2] * regions[:, 3]
        if int(sizes.sum()) != pixels.numel():
            raise ValueError(f"InstanceMasks: {pixels.numel()} pixels given for crops of {int(sizes.sum())} pixels")
        if len(regions) and (bool((regions < 0).any()) or bool((regions[:, 0] + regions[:, 2] > height).any())
                             or bool((regions[:, 1] + regions[:, 3] > width).any())):
            raise ValueError(f"InstanceMasks: a crop region reaches outside the {height}x{width} image")
        self.pixels = pixels
        self.regions = regions
        self.height, self.width = int(height), int(width)
        # Where each crop starts in `pixels` (exclusive cumulative sum of the crop sizes).
        self.starts = torch.cumsum(sizes, 0) - sizes

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, masks: Tensor) -> "InstanceMasks":
        """Return the crops of dense masks [N, H, W] (any non-zero value is foreground; floats from 0.5)."""
        if masks.dim() != 3:
            raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
        _, h, w = masks.shape
        hit = masks >= 0.5 if masks.is_floating_point() else masks != 0
        top, bottom = _extent(hit.any(dim=2))
        left, right = _extent(hit.any(dim=1))
        regions = torch.stack([top, left, bottom - top, right - left], dim=1)
        flat = hit.reshape(-1)
        return _remap(flat, regions, h, w, lambda i, r, c: (i * h + top[i] + r) * w + left[i] + c)

    @classmethod
    def from_crops(cls, crops: Sequence[np.ndarray], origins: Sequence[tuple[int, int]],
                   height: int, width: int) -> "InstanceMasks":
        """Return masks from one 0/1 array per instance and its (top, left) corner in the image."""
        regions = torch.tensor([[t, l, *np.shape(c)] for c, (t, l) in zip(crops, origins)], dtype=torch.int64)
        flat = [np.asarray(c, dtype=np.uint8).reshape(-1) for c in crops]
        pixels = torch.from_numpy(np.concatenate(flat)) if flat else torch.zeros(0, dtype=torch.uint8)
        return cls(pixels, regions, height, width)

    # ---- tensor-like access -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def shape(self) -> torch.Size:
        """(N, H, W), as the dense masks would have."""
        return torch.Size((len(self), self.height, self.width))

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "InstanceMasks":
        """Return the masks on `device` (the trainer moves targets with the model)."""
        return InstanceMasks(self.pixels.to(device, non_blocking=non_blocking),
                             self.regions.to(device, non_blocking=non_blocking), self.height, self.width)

    def __getitem__(self, index: Any) -> "InstanceMasks | np.ndarray":
        """`m[i]`: mask i as a bool H x W array; `m[bool mask / indices / slice]`: those instances."""
        if isinstance(index, tuple):
            raise TypeError("InstanceMasks takes one index (which instances); index pixels of m[i] or m.to_dense()")
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]].to_dense()[0].bool().cpu().numpy()
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index, device=self.regions.device)
        if index.dtype == torch.bool:
            index = torch.nonzero(index).reshape(-1)
        index = index.long().reshape(-1)
        starts, widths = self.starts[index], self.regions[index, 3]
        return _remap(self.pixels, self.regions[index], self.height, self.width,
                      lambda i, r, c: starts[i] + r * widths[i] + c)

    def to_dense(self) -> Tensor:
        """Return the uint8 [N, H, W] tensor (N x H x W bytes: for drawing and tests, never in training)."""
        out = torch.zeros(len(self) * self.height * self.width, dtype=torch.uint8, device=self.device)
        i, r, c = _pixel_coords(self.regions)
        top, left = self.regions[:, 0], self.regions[:, 1]
        out[(i * self.height + top[i] + r) * self.width + left[i] + c] = self.pixels
        return out.view(len(self), self.height, self.width)

    def __repr__(self) -> str:
        return f"InstanceMasks({len(self)} masks of {self.height}x{self.width}, {self.pixels.numel()} crop pixels)"

    # ---- measurements -----------------------------------------------------------------------------

    def area(self) -> Tensor:
        """Return the number of set pixels of each instance, int64 [N]."""
        i, _, _ = _pixel_coords(self.regions)
        return torch.zeros(len(self), dtype=torch.int64, device=self.device).index_add_(0, i, self.pixels.long())

    def boxes(self) -> Tensor:
        """Return tight xyxy boxes [N, 4] float32 (pixel edges); an empty mask gets a zero box."""
        i, r, c = _pixel_coords(self.regions)
        on = self.pixels.bool()
        i, r, c = i[on], r[on], c[on]
        top, left = self.regions[:, 0], self.regions[:, 1]

        def reduce(values: Tensor, how: str) -> Tensor:
            # Untouched rows (empty masks) keep the zero they start from, as mask_boxes gave them.
            return torch.zeros(len(self), dtype=torch.int64, device=self.device).scatter_reduce(
                0, i, values, how, include_self=False)

        y1, y2 = reduce(top[i] + r, "amin"), reduce(top[i] + r + 1, "amax")
        x1, x2 = reduce(left[i] + c, "amin"), reduce(left[i] + c + 1, "amax")
        return torch.stack([x1, y1, x2, y2], dim=1).float()

    # ---- geometry: each exactly the dense tensor's operation ---------------------------------------

    def hflip(self) -> "InstanceMasks":
        """Mirror left-right, as `dense.flip(-1)`."""
        t, l, h, w = self.regions.unbind(1)
        regions = torch.stack([t, self.width - l - w, h, w], dim=1)
        return self._gather(regions, self.height, self.width, lambda i, r, c: (r, w[i] - 1 - c))

    def vflip(self) -> "InstanceMasks":
        """Mirror top-bottom, as `dense.flip(-2)`."""
        t, l, h, w = self.regions.unbind(1)
        regions = torch.stack([self.height - t - h, l, h, w], dim=1)
        return self._gather(regions, self.height, self.width, lambda i, r, c: (h[i] - 1 - r, c))

    def rot90(self) -> "InstanceMasks":
        """Turn a quarter counter-clockwise, as `torch.rot90(dense, 1, dims=(-2, -1))`: the image becomes W x H.

        Image pixel (y, x) goes to (W - 1 - x, y), so a crop at (t, l) of h x w lands at (W - l - w, t),
        w x h, and its pixel (r, c) comes from the old crop's (c, w - 1 - r).
        """
        t, l, h, w = self.regions.unbind(1)
        regions = torch.stack([self.width - l - w, t, w, h], dim=1)
        return self._gather(regions, self.width, self.height, lambda i, r, c: (c, w[i] - 1 - r))

    def crop(self, top: int, left: int, height: int, width: int) -> "InstanceMasks":
        """Return the masks of the window [top:top+height, left:left+width] (instances that miss it: empty)."""
        t, l, h, w = self.regions.unbind(1)
        y1, y2 = (t.clamp(top, top + height), (t + h).clamp(top, top + height))
        x1, x2 = (l.clamp(left, left + width), (l + w).clamp(left, left + width))
        regions = torch.stack([y1 - top, x1 - left, y2 - y1, x2 - x1], dim=1)
        return self._gather(regions, height, width, lambda i, r, c: (r + y1[i] - t[i], c + x1[i] - l[i]))

    def resize(self, height: int, width: int) -> "InstanceMasks":
        """Return the masks resized to height x width with exactly the pixels of nearest interpolation.

        Today's dense path was `F.interpolate(masks[:, None].float(), (height, width), mode="nearest")`.
        Which source row each output row reads is taken from that very function (on a ramp of row
        numbers), so rounding is PyTorch's own; each crop then keeps the output rows and columns whose
        source lies inside it (a contiguous run, as the map never decreases).
        """
        rows = _nearest_source(self.height, height, self.device)
        cols = _nearest_source(self.width, width, self.device)
        t, l, h, w = self.regions.T.contiguous()  # contiguous columns for searchsorted
        y1, y2 = torch.searchsorted(rows, t), torch.searchsorted(rows, t + h)
        x1, x2 = torch.searchsorted(cols, l), torch.searchsorted(cols, l + w)
        regions = torch.stack([y1, x1, y2 - y1, x2 - x1], dim=1)
        return self._gather(regions, height, width,
                            lambda i, r, c: (rows[y1[i] + r] - t[i], cols[x1[i] + c] - l[i]))

    def _gather(self, regions: Tensor, height: int, width: int,
                source: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> "InstanceMasks":
        """Return masks with new `regions` whose pixel (i, r, c) is old crop i's pixel `source(i, r, c)`."""
        starts, widths = self.starts, self.regions[:, 3]

        def flat(i: Tensor, r: Tensor, c: Tensor) -> Tensor:
            old_r, old_c = source(i, r, c)
            return starts[i] + old_r * widths[i] + old_c

        return _remap(self.pixels, regions, height, width, flat)

    # ---- mask targets -------------------------------------------------------------------------------

    def roi_targets(self, matched: Tensor, boxes: Tensor, size: int) -> Tensor:
        """Return [P, size, size] binary targets: mask `matched[p]` resampled into box p (RoIAlign, >= 0.5).

        Bit for bit what RoIAlign (aligned, adaptive sampling) gives on the dense [N, H, W] masks: each
        matched instance is painted into one zeroed image-sized plane, the RoIs matched to it are pooled
        from that plane, and the crop is erased again. Pooling from the crop itself with shifted RoIs
        would be equal in exact arithmetic but not in float32 (RoIAlign's sample positions round
        differently at other magnitudes, which can tip a value sitting at 0.5), so the plane keeps the
        original coordinates. Memory: one H x W float plane; time: one RoIAlign call per matched instance.
        """
        out = boxes.new_zeros((len(boxes), size, size))
        if len(boxes) == 0:
            return out
        plane = boxes.new_zeros((1, 1, self.height, self.width))
        matched = matched.to(boxes.device)
        regions, starts = self.regions.tolist(), self.starts.tolist()
        for g in torch.unique(matched).tolist():
            rows = torch.nonzero(matched == g).squeeze(1)
            t, l, h, w = regions[g]
            window = plane[0, 0, t : t + h, l : l + w]
            window.copy_(self.pixels[starts[g] : starts[g] + h * w].view(h, w))
            rois = torch.cat([boxes.new_zeros((len(rows), 1)), boxes[rows]], dim=1)
            out[rows] = roi_align(plane, rois, (size, size), 1.0, 0, aligned=True)[:, 0]
            window.zero_()
        return (out >= 0.5).to(boxes.dtype)


def as_instance_masks(masks: "InstanceMasks | Tensor | np.ndarray") -> InstanceMasks:
    """Return `masks` as InstanceMasks: unchanged if already so, else cropped from a dense [N, H, W] tensor."""
    if isinstance(masks, InstanceMasks):
        return masks
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be InstanceMasks or an [N, H, W] tensor, got {type(masks).__name__}")
    return InstanceMasks.from_dense(masks)


def _pixel_coords(regions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return (instance, row, column) of every pixel of crops laid out as `regions`, in buffer order."""
    heights, widths = regions[:, 2], regions[:, 3]
    sizes = heights * widths
    device = regions.device
    instance = torch.repeat_interleave(torch.arange(len(regions), device=device), sizes)
    local = torch.arange(int(sizes.sum()), device=device) - (torch.cumsum(sizes, 0) - sizes)[instance]
    w = widths[instance]
    return instance, local // w, local % w


def _remap(source: Tensor, regions: Tensor, height: int, width: int, index: SourceIndex) -> InstanceMasks:
    """Return InstanceMasks laid out as `regions` whose pixel (i, r, c) is `source[index(i, r, c)]`."""
    i, r, c = _pixel_coords(regions)
    pixels = source[index(i, r, c)] if len(i) else source.new_zeros(0)
    return InstanceMasks(pixels, regions, height, width)


def _extent(hit: Tensor) -> tuple[Tensor, Tensor]:
    """Return (first, last + 1) index of True along dim 1 of [N, L]; both 0 where a row has none."""
    size = hit.shape[1]
    index = torch.arange(size, device=hit.device)
    first = torch.where(hit, index, size).min(dim=1).values if size else torch.zeros(len(hit), dtype=torch.int64)
    last = torch.where(hit, index, -1).max(dim=1).values + 1 if size else torch.zeros(len(hit), dtype=torch.int64)
    empty = ~hit.any(dim=1)
    return first.masked_fill(empty, 0), last.masked_fill(empty, 0)


def _nearest_source(size: int, new_size: int, device: torch.device) -> Tensor:
    """Return, per output index, the source index `F.interpolate(mode="nearest")` reads (int64 [new_size])."""
    ramp = torch.arange(size, dtype=torch.float32, device=device).view(1, 1, size, 1)  # exact below 2**24
    return F.interpolate(ramp, size=(new_size, 1), mode="nearest").view(-1).long()
