"""COCO's run-length encoding (RLE) of binary masks: the one place masks become RLEs and RLEs become masks again.

An RLE is the dict {"size": [height, width], "counts": ...}. COCO runs down the image's columns (pixel
(y, x) is position x * height + y), alternating runs of background and foreground pixels, the first
one background (possibly empty). The counts come in three forms:

- text: a str, the compressed runs (pycocotools' rleToString). What every encoder here returns: it is
  JSON-ready, so annotation files, COCO results and the service's records carry it as it is.
- bytes: the same compressed runs as bytes, pycocotools' own form (`rle_from_counts` returns it; the
  loader keeps those bytes).
- a list of run lengths (uncompressed; COCO files use it for crowd regions).

Every reader here (decode, area, box, runs) takes any of them. pycocotools does the compression, the
rasterising of polygons and the decoding underneath.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

# {"size": [height, width], "counts": str | bytes | list[int]}
Rle = dict[str, Any]


class RleError(ValueError):
    """RLE counts that are not runs at all: not integers, or a string outside COCO's format."""


class RleCoverageError(RleError):
    """RLE runs that are negative or do not add up to the image's pixels."""


# ---- masks -> RLE ---------------------------------------------------------------------------------


def _text(rle: Rle) -> Rle:
    """Return a pycocotools RLE (bytes counts) as a text RLE: {"size": [h, w], "counts": str}."""
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_mask(mask: np.ndarray) -> Rle:
    """Return the text RLE of one [H, W] mask (bool, or 0/1 values)."""
    return _text(mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8))))


def encode_masks(masks: np.ndarray) -> list[Rle]:
    """Return the text RLEs of [D, H, W] masks (bool, or 0/1 values), in one pycocotools call.

    pycocotools wants an H x W x D Fortran-ordered uint8 array, so this makes one transposed copy of
    all D masks: callers with many large masks pass them in chunks (or encode them one at a time).
    """
    fortran = np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0))
    return [_text(r) for r in mask_utils.encode(fortran)]


def rle_from_runs(runs: Sequence[int], height: int, width: int) -> Rle:
    """Return the text RLE of uncompressed COCO run lengths (background first) of a height x width mask."""
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(v) for v in runs]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def rle_from_positions(positions: np.ndarray, height: int, width: int) -> Rle:
    """Return the text RLE of the pixels at sorted column-major `positions` (x * height + y).

    Working from the positions of one object's pixels costs time in the object's size, not the
    image's, which matters for label images with hundreds of objects.
    """
    total = height * width
    pos = np.asarray(positions, dtype=np.int64)
    if len(pos) == 0:
        return rle_from_runs([total], height, width)
    breaks = np.flatnonzero(np.diff(pos) != 1)
    starts = np.concatenate([pos[:1], pos[breaks + 1]])
    ends = np.concatenate([pos[breaks], pos[-1:]]) + 1
    runs = np.empty(2 * len(starts) + 1, dtype=np.int64)
    runs[0] = starts[0]
    runs[1:-1:2] = ends - starts  # foreground runs
    runs[2:-1:2] = starts[1:] - ends[:-1]  # background runs between them
    runs[-1] = total - ends[-1]
    return rle_from_runs(runs.tolist(), height, width)


def rle_from_crop(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> Rle:
    """Return the text RLE of a `height` x `width` mask that is `crop` at (y0, x0), zero elsewhere.

    Built from the crop's columns alone: COCO's RLE runs down the columns of the whole image, so the
    columns left and right of the crop are one run of zeros each, and the crop's columns need only a
    full-height strip (height x crop width), never the image-sized array.
    """
    h, w = crop.shape
    strip = np.zeros((height, w), dtype=bool)
    strip[y0 : y0 + h] = crop
    flat = strip.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat.size and flat[0]:
        runs = np.concatenate(([0], runs))  # RLE counts start with a run of zeros, maybe empty
    if runs.size == 0:
        runs = np.zeros(1, dtype=np.int64)
    runs[0] += x0 * height  # the all-zero columns left of the crop
    after = (width - x0 - w) * height  # and right of it
    if runs.size % 2:  # the last run is zeros: extend it
        runs[-1] += after
    elif after:
        runs = np.concatenate((runs, [after]))
    return rle_from_runs(runs, height, width)


def rle_from_polygons(polygons: Sequence[np.ndarray | Sequence[float]], height: int, width: int) -> Rle:
    """Return the text RLE of the union of polygons, as pycocotools rasterises them.

    A polygon is a [P, 2] array or COCO's flat [x1, y1, x2, y2, ...] list.
    """
    flat = [p.reshape(-1).tolist() if isinstance(p, np.ndarray) else p for p in polygons]
    rle = mask_utils.merge(mask_utils.frPyObjects(flat, height, width))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


# ---- reading counts -------------------------------------------------------------------------------


def rle_counts(counts: str | bytes) -> list[int]:
    """Return the run lengths of compressed COCO RLE counts (raise ValueError if they are malformed).

    The format (pycocotools' rleToString): each run is a signed number written 5 bits per character
    (character = 48 + value; bit 0x20 = more characters follow, bit 0x10 of the last = negative), and
    from the third run on it is stored as the difference to the run two places before it.
    """
    encoded = counts.encode("ascii") if isinstance(counts, str) else counts
    runs: list[int] = []
    pos, n = 0, len(encoded)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("RLE string ends inside a run")
            c = encoded[pos] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(encoded[pos])!r} cannot appear in an RLE string")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_from_counts(counts: list[int] | str | bytes, h: int, w: int) -> Rle:
    """Return pycocotools' RLE (bytes counts) of an h x w mask from uncompressed (a list) or compressed counts.

    Raises RleCoverageError for runs that do not add up to h * w (pycocotools trusts them and gives
    garbage areas and boxes), RleError for counts that are not runs. The loader and check-dataset both
    judge RLEs here, so what one skips the other reports.
    """
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise RleError("uncompressed RLE counts that are not all integers")
        runs = counts
    else:
        try:
            encoded = counts.encode("ascii") if isinstance(counts, str) else counts
            runs = rle_counts(encoded)
        except (UnicodeEncodeError, ValueError) as e:
            raise RleError(f"compressed RLE counts that cannot be read ({e})") from None
    if any(c < 0 for c in runs):
        raise RleCoverageError("RLE counts with a negative run")
    if sum(runs) != h * w:
        raise RleCoverageError(f"RLE counts that cover {sum(runs)} pixels, not the image's {h}x{w} = {h * w}")
    if isinstance(counts, list):  # uncompressed: pycocotools compresses it
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": encoded}


def _coded(rle: Rle) -> Rle:
    """Return an RLE in a form pycocotools' functions take: compressed counts as bytes."""
    counts = rle["counts"]
    h, w = rle["size"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, h, w)
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    return rle


# ---- RLE -> masks ---------------------------------------------------------------------------------


def decode_rle(rle: Rle) -> np.ndarray:
    """Return the bool [H, W] mask of a COCO RLE (counts as text, bytes or a list of runs)."""
    coded = _coded(rle)
    with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning (harmless)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(coded).astype(bool)


def rle_positions(counts: str | bytes) -> np.ndarray:
    """Return the sorted column-major positions (x * height + y) of the pixels of compressed RLE counts."""
    runs = np.asarray(rle_counts(counts), dtype=np.int64)
    starts = np.cumsum(runs) - runs
    fg_starts, fg_lengths = starts[1::2], runs[1::2]  # runs alternate background, foreground
    first = np.cumsum(fg_lengths) - fg_lengths  # each run's first index among all foreground pixels
    offsets = np.arange(int(fg_lengths.sum())) - np.repeat(first, fg_lengths)
    return np.repeat(fg_starts, fg_lengths) + offsets


def rle_crop(counts: str | bytes, h: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (uint8 crop, (top, left)) of the set pixels of compressed RLE counts of an h-row mask.

    Only the band of columns the foreground runs touch is expanded (columns x h bytes), then trimmed
    to the rows that hold pixels; an empty mask gives a 0 x 0 crop at (0, 0).
    """
    runs = np.asarray(rle_counts(counts), dtype=np.int64)
    ends = np.cumsum(runs)
    starts, ends = (ends - runs)[1::2], ends[1::2]  # foreground runs
    nonempty = ends > starts
    starts, ends = starts[nonempty], ends[nonempty]
    if len(starts) == 0:
        return np.zeros((0, 0), dtype=np.uint8), (0, 0)
    left, right = int(starts[0]) // h, (int(ends[-1]) - 1) // h + 1
    first = left * h
    n = (right - left) * h
    # +1 where a run starts, -1 where it ends; the running sum is 1 inside runs.
    edges = np.bincount(starts - first, minlength=n + 1) - np.bincount(ends - first, minlength=n + 1)
    band = (np.cumsum(edges[:n]) > 0).reshape(right - left, h).T  # [h, columns]
    rows = np.flatnonzero(band.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    return band[top:bottom].astype(np.uint8), (top, left)


# ---- measures -------------------------------------------------------------------------------------


def rle_area(rle: Rle) -> int:
    """Return the number of foreground pixels of a COCO RLE."""
    return int(mask_utils.area(_coded(rle)))


def rle_box(rle: Rle) -> list[float]:
    """Return the [x, y, width, height] box of a COCO RLE's foreground (all zero when it has none)."""
    return [float(v) for v in mask_utils.toBbox(_coded(rle))]


def rle_area_and_box(rle: Rle) -> tuple[int, list[float]]:
    """Return (pixel count, [x, y, width, height]) of a COCO RLE."""
    coded = _coded(rle)
    return int(mask_utils.area(coded)), [float(v) for v in mask_utils.toBbox(coded)]
