"""Pictures for people: detections drawn over an image, and training loss curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskrcnn.errors import UserError

# A fixed palette (Tableau 10-like): instance i gets colour i mod 10, so pictures are reproducible.
PALETTE = np.array([
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
], dtype=np.float32)
MASK_ALPHA = 0.5
# COCO's person skeleton (1-based keypoint pairs), drawn when a 17-keypoint output names no skeleton.
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
                 [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]


def _to_numpy(x: Any) -> np.ndarray:
    """Accept tensors (any device) or arrays."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with at least one 4-neighbour outside it (a one-pixel outline)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _kept_masks(masks: Any, keep: np.ndarray) -> Any:
    """Return the masks of the detections at `keep`: a bool [N,H,W] array, or an `RLEMasks` / `InstanceMasks`
    (ground truth) decoded one at a time."""
    from maskrcnn.instance_masks import InstanceMasks
    from maskrcnn.structures.detections import RLEMasks

    if masks is None or isinstance(masks, (RLEMasks, InstanceMasks)):  # never all decoded at once
        return None if masks is None else masks[keep]
    masks = _to_numpy(masks)
    if masks.ndim == 4:  # torchvision's [D,1,H,W] soft masks
        masks = masks[:, 0]
    return (masks >= 0.5 if masks.dtype.kind == "f" else masks.astype(bool))[keep]


def draw_instances(
    image: np.ndarray,
    output: dict,
    class_names: list[str] | None = None,
    score_threshold: float = 0.5,
    skeleton: list[list[int]] | None = None,
    captions: list[str] | None = None,
) -> Image.Image:
    """Draw translucent masks, box outlines and "name 0.93" labels for detections above the threshold.

    Keypoints (`keypoints` [D,K,3]) are drawn as dots joined by the `skeleton` (1-based pairs, COCO's
    convention; COCO's person skeleton by default when K = 17). `captions`, one per instance, replace
    the "name 0.93" labels (ground truth has no scores).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    scores = _to_numpy(output.get("scores", np.zeros(0))).astype(np.float32).reshape(-1)
    keep = np.nonzero(scores >= score_threshold)[0]
    boxes = _to_numpy(output.get("boxes", np.zeros((0, 4)))).reshape(-1, 4)[keep]
    labels = _to_numpy(output.get("labels", np.zeros(0, dtype=np.int64))).reshape(-1)[keep]
    masks = _kept_masks(output.get("masks"), keep)
    colours = PALETTE[np.arange(len(keep)) % len(PALETTE)]

    canvas = image.astype(np.float32)
    if masks is not None and len(keep):
        # Paint every instance's colour into one layer, then blend once: the blend is per image,
        # not per instance, and later (lower-scoring) instances never darken earlier ones twice.
        layer = np.zeros_like(canvas)
        covered = np.zeros((h, w), dtype=bool)
        last_first = range(len(keep) - 1, -1, -1)  # reversed: the best detection ends on top
        for i in last_first:
            m = masks[i]
            layer[m] = colours[i]
            covered |= m
        canvas[covered] = canvas[covered] * (1 - MASK_ALPHA) + layer[covered] * MASK_ALPHA
        for i in last_first:
            canvas[_contour(masks[i])] = colours[i]
    pil = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(pil)
    keypoints = output.get("keypoints")
    if keypoints is not None and len(keep):
        _draw_keypoints(draw, _to_numpy(keypoints).reshape(len(scores), -1, 3)[keep], colours, skeleton)
    font = ImageFont.load_default()
    for i, box, label, score, c in zip(keep, boxes, labels, scores[keep], colours):
        colour = tuple(int(v) for v in c)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        idx = int(label) - 1
        name = class_names[idx] if class_names and 0 <= idx < len(class_names) else str(int(label))
        text = captions[i] if captions is not None else f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        # Above the box when there is room, otherwise just inside its top edge.
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0 + 1
        tx = min(max(x0, 0), max(w - tw - 4, 0))
        draw.rectangle([tx, ty, tx + tw + 4, ty + th + 4], fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=(255, 255, 255), font=font)
    return pil


def _draw_keypoints(draw: ImageDraw.ImageDraw, keypoints: np.ndarray, colours: np.ndarray,
                    skeleton: list[list[int]] | None) -> None:
    """Draw each instance's skeleton in its colour and its keypoints as white-ringed dots."""
    k = keypoints.shape[1]
    if skeleton is None:
        skeleton = COCO_SKELETON if k == 17 else []
    for points, c in zip(keypoints, colours):
        colour = tuple(int(v) for v in c)
        for a, b in skeleton:
            if 1 <= a <= k and 1 <= b <= k and points[a - 1, 2] > 0 and points[b - 1, 2] > 0:
                draw.line([tuple(points[a - 1, :2]), tuple(points[b - 1, :2])], fill=colour, width=2)
        for x, y, v in points:
            if v > 0:
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour, outline=(255, 255, 255))


def image_grid(images: list[Image.Image], cell: int = 256, columns: int = 0, gap: int = 4) -> Image.Image:
    """Return the images shrunk to fit `cell` x `cell` squares, laid out in rows (about square by default)."""
    if not images:
        raise ValueError("no images to lay out")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell + gap) + gap), (255, 255, 255))
    for i, image in enumerate(images):
        image = image.copy()
        image.thumbnail((cell, cell), Image.Resampling.LANCZOS)  # keeps the aspect ratio
        r, c = divmod(i, columns)
        x = gap + c * (cell + gap) + (cell - image.width) // 2
        y = gap + r * (cell + gap) + (cell - image.height) // 2
        grid.paste(image, (x, y))
    return grid


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read training log rows (JSON lines); rows that are not JSON objects are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metrics file '{path}' does not exist; train first or pass the run's metrics.jsonl")
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a run that is still going
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_loss_curve(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot the total loss and every `loss_*` against `iter` from a JSON-lines log into a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics_jsonl(metrics_jsonl_path) if "iter" in r]
    # The total is logged as "loss" by our trainer and "total_loss" by Detectron2-style logs.
    totals = ("loss", "total_loss")
    keys = sorted({k for r in rows for k in r if k in totals or k.startswith("loss_")},
                  key=lambda k: (k not in totals, k))
    if not keys:
        raise UserError(f"metrics file '{metrics_jsonl_path}' has no rows with 'iter' and loss values")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    positive = True
    for k in keys:
        pts = [(r["iter"], float(r[k])) for r in rows
               if isinstance(r.get(k), (int, float)) and math.isfinite(float(r[k]))]
        if not pts:
            continue
        xs, ys = zip(*pts)
        positive &= min(ys) > 0
        ax.plot(xs, ys, label=k, linewidth=2.0 if k in totals else 1.2)
    if positive:
        ax.set_yscale("log")  # losses span decades; a log axis keeps the small ones readable
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
