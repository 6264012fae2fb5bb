"""Anchors: a few reference boxes per feature-map location, one set per pyramid level."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.config_schema import AnchorConfig


def base_anchors(sizes: list[float], aspect_ratios: list[float], round_to_int: bool) -> Tensor:
    """Return [len(ratios)*len(sizes), 4] xyxy anchors centred on (0, 0), ratio-major.

    An anchor of size s and aspect ratio r = h/w has area s² : w = s/√r, h = s·√r.
    """
    sizes_t = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    widths = (w_ratios[:, None] * sizes_t[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * sizes_t[None, :]).reshape(-1)
    anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2
    return anchors.round() if round_to_int else anchors


class AnchorGenerator(nn.Module):
    """Tiles each level's base anchors over its feature map, location-major then anchor."""

    def __init__(self, cfg: AnchorConfig, strides: list[int]):
        super().__init__()
        if len(cfg.sizes) != len(strides):
            raise ValueError(f"anchors.sizes has {len(cfg.sizes)} levels but the backbone has {len(strides)}")
        self.strides = strides
        self.offset = cfg.offset
        self.stride_from_image = cfg.stride_from_image
        self.cell_anchors = [base_anchors(s, cfg.aspect_ratios, cfg.round_base) for s in cfg.sizes]

    @property
    def num_anchors_per_location(self) -> int:
        """Return how many anchors sit at each location (the same on every level)."""
        return self.cell_anchors[0].shape[0]

    def level_strides(self, grid: tuple[int, int], padded_size: tuple[int, int], level: int) -> tuple[int, int]:
        """Return (stride_y, stride_x) for a level: nominal, or the padded size over the grid size."""
        if self.stride_from_image:
            return padded_size[0] // grid[0], padded_size[1] // grid[1]
        return self.strides[level], self.strides[level]

    def forward(self, features: list[Tensor], padded_size: tuple[int, int]) -> list[Tensor]:
        """Return one [H*W*A, 4] anchor tensor per level (the same for every image of a batch)."""
        anchors = []
        for level, feature in enumerate(features):
            grid = (feature.shape[-2], feature.shape[-1])
            stride_y, stride_x = self.level_strides(grid, padded_size, level)
            device = feature.device
            shift_x = (torch.arange(grid[1], device=device, dtype=torch.float32) + self.offset) * stride_x
            shift_y = (torch.arange(grid[0], device=device, dtype=torch.float32) + self.offset) * stride_y
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1)
            cell = self.cell_anchors[level].to(device)
            anchors.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
        return anchors
