"""Geometry of detections, one concern a module (COCO's RLE itself is `maskrcnn.rle`):

- `boxes`: box maths on xyxy boxes (area, IoU, IoA, clipping, scaling) and the box coder.
- `paste`: pasting the mask head's [M, M] probabilities into their boxes (ours and Detectron2's way).
- `detections`: a detection output's other parts: `RLEMasks` (image-sized masks as RLEs, from tiled
  inference) and `detections_to_cpu`.

`from maskrcnn.structures import NAME` keeps working for the names below, which the documentation,
exported models' code, benchmarks and tests use; they are imported on first use (PEP 562), so that a
module importing `maskrcnn.structures.boxes` loads the box maths alone. The package's own code imports
from the submodules.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule that defines it.
_EXPORTS = {
    **dict.fromkeys(["BOX_SCALE_CLAMP", "BoxCoder", "box_area", "clip_boxes", "nonempty_boxes", "pairwise_ioa",
                     "pairwise_iou", "scale_boxes"], "boxes"),
    **dict.fromkeys(["paste_masks", "paste_masks_grid_sample"], "paste"),
    **dict.fromkeys(["RLEMasks", "detections_to_cpu"], "detections"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maskrcnn.structures' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"maskrcnn.structures.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
