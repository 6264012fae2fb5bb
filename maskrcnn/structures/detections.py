"""What the model returns for one image beyond plain tensors: masks kept as RLEs, and moving it all to the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from maskrcnn.rle import decode_rle


class RLEMasks:
    """Image-sized binary masks of D detections kept as COCO RLEs (counts as str), in detection order.

    What tiled inference returns in place of a bool [D, H, W] tensor, whose size grows with the image
    times the detections. `masks[i]` decodes one mask (bool H x W array); `masks[index]` with a slice,
    index list or bool tensor/array selects detections, as it would on a tensor; `numpy()` decodes all.
    """

    def __init__(self, rles: list[dict], height: int, width: int):
        self.rles = list(rles)
        self.height, self.width = int(height), int(width)

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, H, W), as the dense masks would have."""
        return len(self.rles), self.height, self.width

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return decode_rle(self.rles[index])
        if isinstance(index, slice):
            return RLEMasks(self.rles[index], self.height, self.width)
        index = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return RLEMasks([self.rles[int(i)] for i in index], self.height, self.width)

    def numpy(self) -> np.ndarray:
        """Return all masks decoded, bool [D, H, W] (D x H x W bytes: for a few detections)."""
        out = np.zeros(self.shape, dtype=bool)
        for i in range(len(self)):
            out[i] = self[i]
        return out

    def __repr__(self) -> str:
        return f"RLEMasks({len(self)} masks of {self.height}x{self.width})"


def detections_to_cpu(output: dict[str, Any]) -> dict[str, Any]:
    """Return one image's detections with every tensor moved to the CPU (other values, e.g. RLEMasks, as they are)."""
    return {k: v.cpu() if hasattr(v, "cpu") else v for k, v in output.items()}
