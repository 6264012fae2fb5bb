"""Shapes to polygons, and binary masks back to polygons (contour tracing); COCO RLE is `maskrcnn.rle`.

Coordinates are COCO's continuous pixel coordinates: pixel (row y, column x) covers the square
[x, x+1) x [y, y+1). A polygon that follows pixel edges therefore rasterises (pycocotools) to exactly
the pixels it encloses, which is why the tracer below walks pixel edges rather than pixel centres.
"""

from __future__ import annotations

import math

import numpy as np

from maskrcnn.data import polygons
from maskrcnn.data.polygons import clip_to_rectangle

# Most vertices a circle or ellipse gets: past this the chord error is far below a pixel anyway.
MAX_ELLIPSE_VERTICES = 720
CHORD_ERROR = 0.1  # pixels an ellipse's polygon may lie inside the true curve


# ---- shapes ---------------------------------------------------------------------------------------


def rectangle(x1: float, y1: float, x2: float, y2: float, degrees: float = 0.0) -> np.ndarray:
    """Return the 4 corners [4,2] of a box given by two corners, rotated `degrees` clockwise about its centre."""
    xa, xb = sorted((x1, x2))
    ya, yb = sorted((y1, y2))
    corners = np.array([[xa, ya], [xb, ya], [xb, yb], [xa, yb]], dtype=np.float64)
    if degrees:
        corners = _rotate(corners, np.array([(xa + xb) / 2, (ya + yb) / 2]), math.radians(degrees))
    return corners


def ellipse(cx: float, cy: float, rx: float, ry: float, radians: float = 0.0) -> np.ndarray:
    """Return a polygon [N,2] on the ellipse, rotated `radians` clockwise (in image coordinates, y down).

    N grows with the radius so the polygon stays within CHORD_ERROR pixels of the curve
    (a chord of a circle of radius r over angle 2*pi/N falls short by r * (1 - cos(pi/N))).
    """
    r = max(abs(rx), abs(ry))
    n = MAX_ELLIPSE_VERTICES if r <= 0 else int(math.ceil(math.pi / math.acos(max(1 - CHORD_ERROR / r, -1.0))))
    n = min(max(n, 16), MAX_ELLIPSE_VERTICES)
    t = np.arange(n) * (2 * math.pi / n)
    points = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    return _rotate(points, np.array([cx, cy]), radians) if radians else points


def _rotate(points: np.ndarray, centre: np.ndarray, radians: float) -> np.ndarray:
    """Return points rotated about `centre`; positive angles turn clockwise on screen (y points down)."""
    c, s = math.cos(radians), math.sin(radians)
    d = points - centre
    return np.stack([d[:, 0] * c - d[:, 1] * s, d[:, 0] * s + d[:, 1] * c], axis=1) + centre


def signed_area(points: np.ndarray) -> float:
    """Return the shoelace area of a polygon [P,2]; positive when clockwise on screen (y down)."""
    x, y = points[:, 0], points[:, 1]
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2)


def collinear(points: np.ndarray) -> bool:
    """Return True if all points lie on one line (or coincide), up to the rounding of computed vertices."""
    return polygons.collinear(points, atol=1e-9)


def clip_polygon(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """Return the part of polygon [P,2] inside the image rectangle 0..width x 0..height.

    Annotation tools let vertices stray past the border; clipping keeps boxes inside the image. Crossing
    points are put exactly on the border (`snap`), so a clipped vertex never lands a hair outside.
    """
    return clip_to_rectangle(points, (0.0, 0.0), (width, height), snap=True)


# ---- contour tracing ------------------------------------------------------------------------------

_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])  # directions 0..3: +x, +y, -x, -y (each a right turn on screen)


def mask_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Return the boundary rings [P,2] of a boolean [H,W] mask, along pixel edges, corners only.

    Every edge between a foreground and a background pixel (the image border counts as background)
    is directed so the foreground lies on its right; at each vertex the walk continues with the one
    edge leaving it, and where two leave (two pixels touching only at a corner) it turns right, so
    such pixels belong to separate rings. Outer boundaries come out clockwise on screen (positive
    `signed_area`), holes anticlockwise. The rings enclose exactly the mask's pixels.
    """
    m = np.pad(np.asarray(mask, dtype=np.int8), 1)
    h, w = mask.shape
    dh = m[1:, 1:-1] - m[:-1, 1:-1]  # [H+1, W]: on grid line y, pixel (y, x) minus pixel (y-1, x)
    dv = m[1:-1, 1:] - m[1:-1, :-1]  # [H, W+1]: on grid line x, pixel (y, x) minus pixel (y, x-1)
    parts = []
    y, x = np.nonzero(dh == 1)  # top edge of a foreground pixel: run +x
    parts.append((x, y, 0))
    y, x = np.nonzero(dh == -1)  # bottom edge: run -x from its right end
    parts.append((x + 1, y, 2))
    y, x = np.nonzero(dv == -1)  # right edge of the pixel to the left of line x: run +y
    parts.append((x, y, 1))
    y, x = np.nonzero(dv == 1)  # left edge of the pixel right of line x: run -y from its bottom end
    parts.append((x, y + 1, 3))
    sx = np.concatenate([p[0] for p in parts]).astype(np.int64)
    sy = np.concatenate([p[1] for p in parts]).astype(np.int64)
    dirs = np.concatenate([np.full(len(p[0]), p[2], dtype=np.int64) for p in parts])
    if len(dirs) == 0:
        return []
    stride = w + 1
    start_key = sy * stride + sx
    end_key = (sy + _STEP[dirs, 1]) * stride + (sx + _STEP[dirs, 0])
    leaving: dict[int, list[int]] = {}
    for e, k in enumerate(start_key.tolist()):
        leaving.setdefault(k, []).append(e)

    dirs_list, end_list = dirs.tolist(), end_key.tolist()
    used = np.zeros(len(dirs), dtype=bool)
    rings = []
    for first in range(len(dirs)):
        if used[first]:
            continue
        ring_edges = []
        e = first
        while not used[e]:
            used[e] = True
            ring_edges.append(e)
            nxt = leaving[end_list[e]]
            if len(nxt) == 1:
                e = nxt[0]
            else:  # a corner shared by two diagonal pixels: turn right, staying with this pixel
                right = (dirs_list[e] + 1) % 4
                e = nxt[0] if dirs_list[nxt[0]] == right else nxt[1]
        idx = np.array(ring_edges)
        d = dirs[idx]
        corner = d != np.roll(d, 1)  # an edge starts at a corner where the direction changes
        rings.append(np.stack([sx[idx][corner], sy[idx][corner]], axis=1).astype(np.float64))
    return rings


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """Return one polygon [P,2] covering exactly the mask's pixels (rings traced, then joined), or None
    if the mask is empty. Traces only the mask's bounding box, so small objects on big images are cheap."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    y0, x0 = int(rows[0]), int(cols[0])
    rings = mask_rings(mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1])
    return join_rings(rings) + [x0, y0]


def join_rings(rings: list[np.ndarray]) -> np.ndarray:
    """Return one polygon [P,2] holding all rings, joined by zero-width bridges.

    Formats with one polygon per object (YOLO) cannot list holes or separate parts. Each ring (largest
    first) is spliced in where it comes close to the polygon so far: the walk goes out along a bridge,
    round the ring and back along the same bridge. The bridge encloses no area, so the even-odd fill
    of pycocotools (and of OpenCV's fillPoly, which Ultralytics uses) gives the same pixels as the
    rings together: a hole (wound the other way) stays empty, and separate parts stay filled.
    """
    if not rings:
        return np.zeros((0, 2))
    order = sorted(range(len(rings)), key=lambda i: -abs(signed_area(rings[i])))
    chain = rings[order[0]]
    for i in order[1:]:
        ring = rings[i]
        # Two nearest-point look-ups (chain point nearest the ring's first vertex, then the ring point
        # nearest that) keep bridges short at a cost linear in the vertices; the exact closest pair
        # costs chain x ring per ring, seconds on a speckled mask with thousands of rings.
        a = int(((chain - ring[0]) ** 2).sum(axis=1).argmin())
        b = int(((ring - chain[a]) ** 2).sum(axis=1).argmin())
        chain = np.concatenate([chain[: a + 1], ring[b:], ring[: b + 1], chain[a:]])
    return chain
