"""Detections as JSON-ready records (xyxy boxes, COCO RLE masks): shared by the service and video output."""

from __future__ import annotations

from typing import Any

import numpy as np


def detection_records(output: dict[str, Any], ids: list[int]) -> list[dict[str, Any]]:
    """Return one record per detection: box (xyxy px), label (1..K), category_id, name, score, mask (RLE)."""
    from maskrcnn.rle import encode_mask
    from maskrcnn.structures.detections import RLEMasks

    masks = output.get("masks")
    if isinstance(masks, RLEMasks):  # tiled inference: RLE already
        masks = [dict(rle) for rle in masks.rles]
    else:
        # One mask at a time: pycocotools holds the GIL while it encodes, so a server's other threads (its
        # event loop) wait at most one mask's encoding; and no N×H×W transposed copy is made (4× faster for
        # 50 masks of 1000×1000 than encoding them together).
        masks = [encode_mask(mask) for mask in np.asarray(masks)] if masks is not None else []
    names = output.get("names") or [f"class {int(i)}" for i in output["labels"]]
    records = []
    for i in range(len(output["boxes"])):
        label = int(output["labels"][i])
        entry = {"box": [round(float(v), 2) for v in output["boxes"][i]], "label": label,
                 "category_id": ids[label - 1] if 1 <= label <= len(ids) else label,
                 "name": names[i], "score": round(float(output["scores"][i]), 5)}
        if masks:
            entry["mask"] = masks[i]
        records.append(entry)
    return records
