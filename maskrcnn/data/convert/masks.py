"""Reading integer label images (PNG, TIFF) and splitting them into objects' pixel sets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from maskrcnn.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")


def read_label_image(path: Path, palette_colours: dict[int, int] | None = None) -> np.ndarray | str:
    """Return a label image as a 2-D int64 array (one integer per pixel), or why it cannot be one.

    PNG (8/16-bit grey or palette: the palette indices are the values) through PIL; TIFF (8/16/32-bit,
    integer or whole-number float) through tifffile. With `palette_colours` (colour as 0xRRGGBB ->
    value), RGB images are mapped back to values (VOC masks saved without their palette).
    """
    if not path.is_file():
        return "missing label image"
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            array = _read_tiff(path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    mode = im.mode
                    if mode in ("RGB", "RGBA") and palette_colours is not None:
                        return _from_colours(np.asarray(im.convert("RGB")), palette_colours)
                    if mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                        return f"label image in colour mode {mode} (needs one integer per pixel)"
                    array = np.asarray(im)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - damaged or not an image: the file is named in the warning
        return "unreadable label image"
    array = np.squeeze(array)
    if array.ndim != 2:
        return f"label image of shape {tuple(array.shape)} (needs one 2-D plane)"
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            return "label image with fractional values (needs integers)"
    elif array.dtype.kind not in "biu":
        return f"label image of type {array.dtype} (needs integers)"
    if array.dtype.kind in "fi" and array.size and array.min() < 0:
        return "label image with negative values"
    return array.astype(np.int64)


def _read_tiff(path: Path) -> np.ndarray:
    """Return the first series of a TIFF file (tifffile reads the 16/32-bit integer layouts PIL does not)."""
    try:
        import tifffile
    except ModuleNotFoundError:
        raise UserError(f"reading the TIFF label image '{path}' needs tifffile: pip install tifffile") from None
    return tifffile.imread(path)


def _from_colours(rgb: np.ndarray, palette_colours: dict[int, int]) -> np.ndarray | str:
    """Return the values of an RGB image's colours in `palette_colours`, or a reason if one is not there."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    unique, inverse = np.unique(codes, return_inverse=True)
    missing = [int(c) for c in unique if int(c) not in palette_colours]
    if missing:
        return f"colour #{missing[0]:06x} outside the palette"
    values = np.array([palette_colours[int(c)] for c in unique], dtype=np.int64)
    return values[inverse.reshape(codes.shape)]


def instances(labels: np.ndarray, ignore: tuple[int, ...] = (0,)) -> list[tuple[int, np.ndarray]]:
    """Return (value, sorted column-major positions) for every value in `labels` not in `ignore`.

    Positions index the image in COCO's RLE order (x * height + y). One stable sort of the labelled
    pixels splits them all, instead of one full-image comparison per object.
    """
    flat = labels.ravel(order="F")
    keep = np.ones(flat.shape, dtype=bool)
    for v in ignore:
        keep &= flat != v
    positions = np.flatnonzero(keep)
    values = flat[positions]
    order = np.argsort(values, kind="stable")  # stable: positions stay ascending within a value
    values, positions = values[order], positions[order]
    uniques, starts = np.unique(values, return_index=True)
    ends = np.append(starts[1:], len(values))
    return [(int(v), positions[s:e]) for v, s, e in zip(uniques, starts, ends)]


def majority(labels: np.ndarray, positions: np.ndarray, ignore: tuple[int, ...] = (0,)) -> int | None:
    """Return the most common value of `labels` at `positions` (column-major), leaving out `ignore`."""
    values = labels.ravel(order="F")[positions]
    for v in ignore:
        values = values[values != v]
    if values.size == 0:
        return None
    uniques, counts = np.unique(values, return_counts=True)
    return int(uniques[counts.argmax()])


def voc_colours(n: int = 256) -> dict[int, int]:
    """Return colour (0xRRGGBB) -> index of the Pascal VOC palette.

    The devkit's colour map: the bits of the index, three at a time, go to the red, green and blue
    channels from the most significant bit down (index 1 = dark red (128, 0, 0), 255 = (224, 224, 192)).
    """
    out = {}
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[(r << 16) | (g << 8) | b] = i
    return out
