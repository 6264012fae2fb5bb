"""COCO's run-length encoding (RLE) of masks: reading counts, compressed or not, and checking they cover the image.

The loader and check-dataset both judge RLEs here, so what one skips the other reports.
"""

from __future__ import annotations

from typing import Any

from pycocotools import mask as mask_utils


class RleError(ValueError):
    """RLE counts that are not runs at all: not integers, or a string outside COCO's format."""


class RleCoverageError(RleError):
    """RLE runs that are negative or do not add up to the image's pixels."""


def rle_from_counts(counts: list[int] | str | bytes, h: int, w: int) -> dict[str, Any]:
    """Return pycocotools' RLE of an h x w mask from uncompressed (a list) or compressed (a string) counts.

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


def rle_counts(encoded: bytes) -> list[int]:
    """Return the run lengths of a compressed COCO RLE string (raise ValueError if it is malformed).

    The format (pycocotools' rleToString): each run is a signed number written 5 bits per character
    (character = 48 + value; bit 0x20 = more characters follow, bit 0x10 of the last = negative), and
    from the third run on it is stored as the difference to the run two places before it.
    """
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
