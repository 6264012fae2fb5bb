"""COCO's results format: one image's detections as COCO result dicts, and results files read and written.

A result is {"image_id", "category_id", "bbox": [x, y, w, h], "score"} plus "segmentation" (a COCO RLE,
counts as text) for masks and "keypoints" (x, y, score triplets in COCO's integer-pixel coordinates).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from maskrcnn.errors import UserError
from maskrcnn.fileio import atomic_write_text
from maskrcnn.rle import encode_masks as rle_encode_masks
from maskrcnn.structures.detections import RLEMasks

# Masks turned into RLE at a time (see encode_masks).
RLE_MASKS_PER_CHUNK = 64


# ---- model output -> COCO results -----------------------------------------------------------------


def _masks_to_numpy(masks: torch.Tensor) -> np.ndarray:
    """Return [D,H,W] uint8 0/1, accepting [D,1,H,W] and soft (float) masks as torchvision emits."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.is_floating_point():
        masks = masks >= 0.5
    return masks.to(torch.uint8).cpu().numpy()


def encode_masks(masks: torch.Tensor, chunk: int = RLE_MASKS_PER_CHUNK) -> list[dict]:
    """Return one COCO RLE (counts as str) per mask of [D,H,W] or [D,1,H,W], `chunk` masks at a time.

    Chunks bound the copies encoding needs (uint8, then Fortran order: two D x H x W arrays at once
    otherwise), which matters with thousands of detections on a large image.
    """
    rles: list[dict] = []
    for start in range(0, masks.shape[0], chunk):
        rles += rle_encode_masks(_masks_to_numpy(masks[start : start + chunk]))  # one encode call per chunk
    return rles


def predictions_to_coco(output: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """Convert one image's model output (xyxy boxes, labels 1..K, masks) into COCO result dicts."""
    boxes = output["boxes"].detach().float().cpu()
    if boxes.numel() == 0:
        return []
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    bad = [lab for lab in labels if not 1 <= lab <= len(category_ids)]
    if bad:
        raise ValueError(f"label {bad[0]} is outside 1..{len(category_ids)} (the dataset's categories)")
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    xywh = xywh.tolist()

    masks = output.get("masks")
    if isinstance(masks, RLEMasks):  # tiled inference: already RLE, never a [D,H,W] array
        rles = [dict(rle) for rle in masks.rles]
    else:
        rles = encode_masks(masks.detach()) if masks is not None else None

    keypoints = None
    if output.get("keypoints") is not None:
        # COCO keypoints are integer pixel indices, ours continuous coordinates (a pixel's centre at
        # i + 0.5): subtract the 0.5 the dataset added (as Detectron2 does). The third value is each
        # keypoint's score, as Detectron2 writes it (COCOeval reads only x and y of detections), or 1.
        kp = output["keypoints"].detach().float().cpu().clone()
        kp[..., :2] -= 0.5
        kp_scores = output.get("keypoint_scores")
        kp[..., 2] = kp_scores.detach().float().cpu() if kp_scores is not None else 1.0
        keypoints = kp.flatten(1).tolist()

    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        r = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "bbox": box,
             "score": float(score)}
        if rles is not None:
            r["segmentation"] = rles[i]
        if keypoints is not None:
            r["keypoints"] = keypoints[i]
        results.append(r)
    return results


# ---- results files ------------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a COCO results file (a JSON list of detections)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file '{path}' does not exist")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"predictions file '{path}' is not valid JSON ({e})") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise UserError(f"predictions file '{path}' must be a JSON list of COCO detections")
    return results


def write_predictions(results: list[dict], path: Path) -> None:
    """Write COCO results JSON atomically."""
    atomic_write_text(path, json.dumps(results))
