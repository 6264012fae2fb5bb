"""A COCO annotation file as a few flat numpy arrays: small, fast to load, shared by forked workers.

`CocoDataset` used to keep every annotation as Python dicts and lists: ~5 GB for COCO train2017's
860 000 annotations, and each forked DataLoader worker copied the pages it read (touching a Python
object writes its reference count; a numpy buffer has none). Here the file is streamed one annotation
at a time (`jsonfile.stream_members`) into growing `array` buffers, checked as the per-annotation loader
checked it before (tests/test_coco_table.py keeps that loader as its oracle): the same skip reasons
and counts; the structural checks per annotation, the arithmetic ones vectorised over all of them at the end, and kept as:

- per image: id, height, width, file name (one UTF-8 buffer + offsets), and the range of its records;
- per kept annotation (a "record"), grouped by image in file order: xyxy box, label, iscrowd, its
  polygons (rows of [start, end) into one float64 coordinate buffer) or its RLE (a range of one byte
  buffer of compressed counts), and keypoints [K, 3].

`AnnotationTable.records(i)` rebuilds image i's record dicts exactly as the old loader made them.
`load_table(path, cache_dir)` optionally keeps the parsed table in `cache_dir`, keyed by the file's
SHA-256, so the next load only reads arrays back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from maskrcnn.data import coco_checks as checks
from maskrcnn.data.jsonfile import DuplicateMember, json_error, read_json_text, stream_members
from maskrcnn.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the arrays or their meaning change: older cache files are then ignored

# Skip reasons by code (0 = kept), in the order the old loader's messages name them.
REASONS = (checks.ZERO_AREA_BOX, checks.SHORT_POLYGON, checks.EMPTY_MASK, checks.NO_SEGMENTATION,
           checks.BAD_SEGMENTATION, checks.SIZE_MISMATCH, checks.NON_FINITE, checks.BAD_BOX, checks.BAD_RLE)
CODE = {reason: k + 1 for k, reason in enumerate(REASONS)}
_BOX_GIVEN, _BOX_ABSENT = 0, -1  # box states besides a skip code
_KP_NONE, _KP_VALUES, _KP_BAD = 0, 1, 2
_NAN4 = (float("nan"),) * 4
_CHUNK = 20_000  # annotations per vectorised step: bounds the temporaries (a few arrays of their points)


@dataclass
class AnnotationTable:
    """The usable annotations of one COCO file, per image, as flat arrays (see the module docstring)."""

    image_ids: np.ndarray  # int64 [I], in file order
    heights: np.ndarray  # int64 [I]
    widths: np.ndarray  # int64 [I]
    name_bytes: np.ndarray  # uint8: the file names, UTF-8, one after another
    name_offsets: np.ndarray  # int64 [I+1]
    record_offsets: np.ndarray  # int64 [I+1]: image i's records are rows record_offsets[i]:record_offsets[i+1]
    boxes: np.ndarray  # float64 [R, 4] xyxy, clipped to the image
    labels: np.ndarray  # int64 [R], 1..C
    iscrowd: np.ndarray  # int8 [R]
    polygon_offsets: np.ndarray  # int64 [R+1]: record r's polygons are rows polygon_offsets[r]:polygon_offsets[r+1]
    polygon_bounds: np.ndarray  # int64 [P, 2]: [start, end) of a polygon's x, y, x, y... in coords
    coords: np.ndarray  # float64 [C]
    rle_offsets: np.ndarray  # int64 [R+1]: record r's compressed RLE counts (empty range: polygons)
    rle_bytes: np.ndarray  # uint8
    keypoints: np.ndarray  # float32 [R, K, 3]
    meta: dict  # categories, keypoint names and skeleton, skip counts (JSON-ready)

    # -- what CocoDataset reads

    @property
    def num_keypoints(self) -> int:
        return len(self.meta["keypoint_names"])

    def image_info(self, i: int) -> dict[str, Any]:
        """Return image i's id, file_name, height and width as the file's entry has them."""
        a, b = self.name_offsets[i], self.name_offsets[i + 1]
        name = self.name_bytes[a:b].tobytes().decode("utf-8", "surrogatepass")
        return {"id": int(self.image_ids[i]), "file_name": name, "height": int(self.heights[i]),
                "width": int(self.widths[i])}

    def records(self, i: int) -> list[dict[str, Any]]:
        """Return image i's records: dicts with box, label, iscrowd, segmentation (pycocotools form) and,
        for keypoint files, keypoints [K, 3], equal to those the per-annotation loader built."""
        h, w = int(self.heights[i]), int(self.widths[i])
        out = []
        for r in range(int(self.record_offsets[i]), int(self.record_offsets[i + 1])):
            record = {"box": self.boxes[r].tolist(), "label": int(self.labels[r]), "iscrowd": int(self.iscrowd[r]),
                      "segmentation": self._segmentation(r, h, w)}
            if self.num_keypoints:
                record["keypoints"] = self.keypoints[r].copy()
            out.append(record)
        return out

    def _segmentation(self, r: int, h: int, w: int) -> Any:
        a, b = self.rle_offsets[r], self.rle_offsets[r + 1]
        if b > a:
            return {"size": [h, w], "counts": self.rle_bytes[a:b].tobytes()}
        rows = self.polygon_bounds[self.polygon_offsets[r]:self.polygon_offsets[r + 1]]
        return [self.coords[s:e].tolist() for s, e in rows]

    def usable_images(self, filter_empty: bool, min_keypoints: int) -> np.ndarray:
        """Return the positions of the images to keep: with `filter_empty`, those with a non-crowd record
        and (when `min_keypoints` > 0 in a keypoint file) at least that many labelled keypoints."""
        n = len(self.image_ids)
        if not filter_empty:
            return np.arange(n)
        image_of = np.repeat(np.arange(n), np.diff(self.record_offsets))
        solid = self.iscrowd == 0
        keep = np.bincount(image_of[solid], minlength=n) > 0
        if min_keypoints and self.num_keypoints:
            labelled = (self.keypoints[solid, :, 2] > 0).sum(axis=1)
            keep &= np.bincount(image_of[solid], weights=labelled, minlength=n) >= min_keypoints
        return np.flatnonzero(keep)

    def check_pixels(self, path: Path, max_pixels: int) -> None:
        """Raise the loader's UserError for the first image above `max_pixels` (the cache is built without
        a limit, so one table serves every setting)."""
        large = np.flatnonzero(self.heights * self.widths > max_pixels)
        if len(large):
            i = int(large[0])
            info = self.image_info(i)
            raise checks.too_many_pixels(path, i, info["file_name"], info["width"], info["height"], max_pixels)

    # -- the cache file

    def save(self, path: Path) -> None:
        """Write the table to `path` (.npz) atomically: a temporary file in the same folder, then a rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}
        meta = np.frombuffer(json.dumps({**self.meta, "format": FORMAT}).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, meta=meta, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> AnnotationTable:
        """Read a table written by `save`; raise ValueError (or an OS / zip error) if it is not one."""
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')}, expected {FORMAT}")
            arrays = {f.name: npz[f.name] for f in fields(cls) if f.name != "meta"}
        table = cls(**arrays, meta=meta)
        table._check_shapes()
        return table

    def _check_shapes(self) -> None:
        """Raise ValueError if the arrays do not fit together (a damaged or foreign cache file)."""
        n, r = len(self.image_ids), len(self.labels)
        ok = (len(self.heights) == len(self.widths) == n and len(self.name_offsets) == len(self.record_offsets) == n + 1
              and self.boxes.shape == (r, 4) and len(self.iscrowd) == r and len(self.polygon_offsets) == r + 1
              and len(self.rle_offsets) == r + 1 and self.keypoints.shape[:1] == (r,)
              and int(self.record_offsets[-1]) == r and int(self.name_offsets[-1]) == len(self.name_bytes)
              and int(self.polygon_offsets[-1]) == len(self.polygon_bounds)
              and int(self.rle_offsets[-1]) == len(self.rle_bytes)
              and (len(self.polygon_bounds) == 0 or int(self.polygon_bounds.max()) <= len(self.coords)))
        if not ok:
            raise ValueError("arrays of inconsistent sizes")


def load_table(path: Path, cache_dir: str | os.PathLike | None = None) -> AnnotationTable:
    """Return the table of the COCO file `path`, from `cache_dir` when it holds this file's table.

    The cache is keyed by the SHA-256 of the file's bytes, so an edited file is parsed afresh; a cache
    file that cannot be read (damaged, or from another version) is ignored with a one-line warning and
    replaced. Without `cache_dir` nothing is written.
    """
    if not cache_dir:
        return parse_table(path)
    cached = Path(cache_dir) / f"coco-{_sha256(path)}.npz"
    if cached.exists():
        try:
            return AnnotationTable.load(cached)
        except Exception as e:  # noqa: BLE001 - any damage: parse again and overwrite
            logger.warning(f"ignoring the annotation cache '{cached}' for '{path}' ({type(e).__name__}: {e}); "
                           "parsing the file again")
    table = parse_table(path)
    try:
        table.save(cached)
    except OSError as e:
        logger.warning(f"cannot write the annotation cache '{cached}' ({e.strerror}); continuing without it")
    return table


def _sha256(path: Path) -> str:
    """Return the SHA-256 of a file, read in blocks (or raise the loader's UserError if it cannot be read)."""
    if not path.is_file():
        read_json_text(path)  # raises the one-line error for a missing file or a folder
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as e:
        raise UserError(f"annotation file '{path}' cannot be read: {e.strerror}") from None
    return digest.hexdigest()


def parse_table(path: Path) -> AnnotationTable:
    """Parse and check the COCO file `path` into a table (raise UserError naming what is wrong)."""
    text = read_json_text(path)
    builder = _Builder(path)
    try:
        members = stream_members(text, {"annotations": builder.add})
    except json.JSONDecodeError as e:
        raise json_error(path, e) from None
    except DuplicateMember as e:
        raise UserError(f"'{path}' has two '{e}' lists; keep one") from None
    del text  # the annotations are all in the builder's buffers now
    checks.check_top_level(members, path)  # a streamed 'annotations' list is there as [] (it was a list)
    return builder.finish(members["images"], members["categories"])


class _Builder:
    """Collects annotations one at a time into flat buffers, then checks and groups them (`finish`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.image_id, self.category_id, self.ann_id = array("q"), array("q"), array("q")
        self.has_id, self.crowd, self.reason = array("b"), array("b"), array("b")
        self.box, self.box_state = array("d"), array("b")
        self.coords = array("d")  # every polygon's x, y, x, y...
        self.polygon_end = array("q")  # per polygon: its end in coords (it starts where the previous ends)
        self.ann_polygons = array("q")  # per annotation: the number of polygons so far, after it
        self.rles: dict[int, dict] = {}  # annotation index -> its RLE object (few: checked at the end)
        self.kp_values, self.kp_end, self.kp_state = array("d"), array("q"), array("b")

    # -- one annotation (structure only: no image sizes or categories needed yet)

    def add(self, i: int, ann: Any) -> None:
        """Take annotations[i]: check its structure, keep its numbers, note a skip reason found already."""
        if type(ann) is dict:  # the usual case decided at once; anything else gets the full check's words
            image_id, category_id, ann_id = ann.get("image_id"), ann.get("category_id"), ann.get("id")
            crowd = ann.get("iscrowd", 0)
        if not (type(ann) is dict and type(image_id) is int and type(category_id) is int
                and (ann_id is None or type(ann_id) is int) and crowd in (0, 1, None)):
            image_id, category_id, ann_id, crowd = checks.check_annotation(ann, i, self.path)
        crowd = int(crowd or 0)
        try:
            self.image_id.append(image_id)
            self.category_id.append(category_id)
            self.ann_id.append(ann_id if ann_id is not None else 0)
        except OverflowError:
            raise UserError(f"'{self.path}': annotations[{i}] has an id beyond 64 bits; renumber it") from None
        self.has_id.append(ann_id is not None)
        self.crowd.append(crowd)
        self.reason.append(self._add_segmentation(i, ann.get("segmentation")))
        self.ann_polygons.append(len(self.polygon_end))
        self.box_state.append(self._add_box(ann.get("bbox")))
        self.kp_state.append(self._add_keypoints(ann.get("keypoints")))
        self.kp_end.append(len(self.kp_values))
        self.count += 1

    def _add_segmentation(self, i: int, seg: Any) -> int:
        """Keep a segmentation's polygons (or its RLE, for later); return the skip code found, or 0.

        The same structural checks, in the same order, as `coco_checks.prepare_segmentation`; `array.extend`
        does the number check (it refuses strings, nulls and lists; JSON has no other non-numbers).
        """
        if seg is None or (isinstance(seg, (list, dict)) and not seg):
            return CODE[checks.NO_SEGMENTATION]
        if isinstance(seg, dict):
            self.rles[i] = seg
            return 0
        if not isinstance(seg, list) or not all(isinstance(p, list) for p in seg):
            return CODE[checks.BAD_SEGMENTATION]
        polygons = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return CODE[checks.SHORT_POLYGON]
        n_coords, n_polygons = len(self.coords), len(self.polygon_end)
        try:
            for p in polygons:
                self.coords.extend(p)
                self.polygon_end.append(len(self.coords))
        except (TypeError, OverflowError) as e:  # a non-number, or an integer too large for a float
            del self.coords[n_coords:], self.polygon_end[n_polygons:]
            return CODE[checks.BAD_SEGMENTATION if isinstance(e, TypeError) else checks.NON_FINITE]
        return 0

    def _add_box(self, bbox: Any) -> int:
        """Keep a bbox's 4 numbers; return _BOX_GIVEN, _BOX_ABSENT or a skip code (as the per-annotation box check judges)."""
        if bbox is None:
            self.box.extend(_NAN4)
            return _BOX_ABSENT
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            self.box.extend(_NAN4)
            return CODE[checks.BAD_BOX]
        n = len(self.box)
        try:
            self.box.extend(bbox)
        except (TypeError, OverflowError) as e:
            del self.box[n:]
            self.box.extend(_NAN4)
            return CODE[checks.BAD_BOX if isinstance(e, TypeError) else checks.NON_FINITE]
        return _BOX_GIVEN  # non-finite values are found at the end, with the arithmetic checks

    def _add_keypoints(self, values: Any) -> int:
        """Keep keypoint numbers (their count is checked at the end, when K is known)."""
        if values is None or (isinstance(values, list) and not values):
            return _KP_NONE
        if not isinstance(values, list) or any(type(v) is bool for v in values):
            return _KP_BAD
        n = len(self.kp_values)
        try:
            self.kp_values.extend(values)
        except (TypeError, OverflowError):
            del self.kp_values[n:]
            return _KP_BAD
        return _KP_VALUES

    # -- all annotations

    def finish(self, images: list, categories: list) -> AnnotationTable:
        """Check references and geometry of every annotation; return the table of the usable ones."""
        path = self.path
        checks.check_images(images, path, max_pixels=2**63)  # the limit is the dataset's, checked on the table
        checks.check_categories(categories, path)
        categories = sorted(categories, key=lambda c: c["id"])
        too_large = [e["id"] for e in (*images, *categories) if not -2**63 <= e["id"] < 2**63]
        if too_large:
            raise UserError(f"'{path}' has an image or category id beyond 64 bits ({too_large[0]}); renumber it")
        image_ids = np.array([img["id"] for img in images], dtype=np.int64)
        heights = np.array([img["height"] for img in images], dtype=np.int64)
        widths = np.array([img["width"] for img in images], dtype=np.int64)
        names = [img["file_name"].encode("utf-8", "surrogatepass") for img in images]
        del images

        n = self.count
        ann_image = _np(self.image_id, np.int64)
        ann_cat = _np(self.category_id, np.int64)
        image_pos = self._check_references(image_ids, ann_image, [c["id"] for c in categories], ann_cat)
        h, w = heights[image_pos], widths[image_pos]
        label = np.searchsorted(np.array([c["id"] for c in categories], dtype=np.int64), ann_cat) + 1

        reason = np.array(self.reason, dtype=np.int8)
        mask_box = np.full((n, 4), np.nan)
        rle_counts: dict[int, bytes] = {}
        for i, seg in self.rles.items():  # few (crowds): the loader's own check, one by one
            rle, box, why = checks.prepare_segmentation(seg, int(h[i]), int(w[i]))
            reason[i] = CODE[why] if why else 0
            if why is None:
                rle_counts[i], mask_box[i] = rle["counts"], box
        self.rles.clear()
        coords, bounds, first_polygon, polygon_count = self._prepare_polygons(reason, mask_box, h, w)
        boxes = self._prepare_boxes(reason, mask_box, h, w)

        kept = reason == 0
        skipped = Counter({REASONS[c - 1]: int(k) for c, k in zip(*np.unique(reason[~kept], return_counts=True))})
        order = np.flatnonzero(kept)
        order = order[np.argsort(image_pos[order], kind="stable")]  # grouped by image, file order within
        record_offsets = _offsets(np.bincount(image_pos[order], minlength=len(image_ids)))
        rows = _ranges(first_polygon[order], polygon_count[order])
        rle = [rle_counts.get(int(i), b"") for i in order]
        keypoint_cats = [c for c in categories if isinstance(c.get("keypoints"), list) and c["keypoints"]]
        keypoint_names = [str(k) for k in keypoint_cats[0]["keypoints"]] if keypoint_cats else []
        skeleton = (keypoint_cats[0].get("skeleton") or []) if keypoint_cats else []
        keypoints, bad_keypoints = self._prepare_keypoints(order, len(keypoint_names))
        meta = {
            "category_ids": [int(c["id"]) for c in categories],
            "class_names": [str(c["name"]) for c in categories],
            "keypoint_names": keypoint_names,
            "skeleton": [[int(a), int(b)] for a, b in skeleton],
            "skipped": dict(skipped),
            "boxes_from_masks": int((kept & (_np(self.box_state, np.int8) == _BOX_ABSENT)).sum()),
            "bad_keypoints": bad_keypoints,
            "num_annotations": n,
        }
        return AnnotationTable(
            image_ids=image_ids, heights=heights, widths=widths,
            name_bytes=np.frombuffer(b"".join(names), dtype=np.uint8).copy(),
            name_offsets=_offsets(np.array([len(b) for b in names], dtype=np.int64)),
            record_offsets=record_offsets, boxes=boxes[order], labels=label[order].astype(np.int64),
            iscrowd=_np(self.crowd, np.int8)[order],
            polygon_offsets=_offsets(polygon_count[order]), polygon_bounds=bounds[rows], coords=coords,
            rle_offsets=_offsets(np.array([len(b) for b in rle], dtype=np.int64)),
            rle_bytes=np.frombuffer(b"".join(rle), dtype=np.uint8).copy(),
            keypoints=keypoints, meta=meta,
        )

    def _check_references(self, image_ids: np.ndarray, ann_image: np.ndarray, category_ids: list[int],
                          ann_cat: np.ndarray) -> np.ndarray:
        """Return each annotation's image position; raise the loader's UserError for the first annotation
        with an unknown image or category or a repeated id."""
        n = len(ann_image)
        first_bad: list[tuple[int, int, UserError]] = []
        pos, found = _lookup(image_ids, ann_image)
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            first_bad.append((i, 0, checks.unknown_image(self.path, i, int(ann_image[i]))))
        _, cat_found = _lookup(np.array(category_ids, dtype=np.int64), ann_cat)
        if not cat_found.all():
            i = int(np.flatnonzero(~cat_found)[0])
            first_bad.append((i, 1, checks.unknown_category(self.path, i, int(ann_cat[i]))))
        with_id = np.flatnonzero(_np(self.has_id, np.int8))
        ids = _np(self.ann_id, np.int64)[with_id]
        by_id = np.argsort(ids, kind="stable")
        repeats = with_id[by_id[1:][ids[by_id][1:] == ids[by_id][:-1]]]
        if len(repeats):
            i = int(repeats.min())
            first_bad.append((i, 2, checks.bad_annotation_id(self.path, i, int(self.ann_id[i]))))
        if first_bad:
            raise min(first_bad, key=lambda t: t[:2])[2]
        return pos

    def _prepare_polygons(self, reason: np.ndarray, mask_box: np.ndarray, h: np.ndarray, w: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Check every annotation's polygons as `coco_checks.prepare_segmentation` does (vectorised; the rare
        annotations reaching far outside the image go through it one by one, to be clipped).

        Sets skip codes and mask extents in place; returns the coordinate buffer, polygon bounds [P, 2]
        and each annotation's first polygon row and polygon count.
        """
        n = len(reason)
        coords = _np(self.coords, np.float64)
        ends = _np(self.polygon_end, np.int64)
        bounds = np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1) if len(ends) else np.zeros((0, 2), np.int64)
        after = _np(self.ann_polygons, np.int64)
        first = np.concatenate([[0], after[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
        count = after - first
        with_polygons = np.flatnonzero(count > 0)
        clip: list[int] = []
        for c in range(0, len(with_polygons), _CHUNK):
            anns = with_polygons[c:c + _CHUNK]
            clip += _check_polygon_chunk(coords, bounds, anns, first, count, reason, mask_box, h, w)
        if not clip:
            return coords, bounds, first, count
        # Polygons reaching far outside: the loader clips them (new coordinates, appended at the end).
        extra_coords: list[float] = []
        extra_bounds: list[tuple[int, int]] = []
        base, rows = len(coords), len(bounds)
        for i in clip:
            polygons = [coords[s:e].tolist() for s, e in bounds[first[i]:first[i] + count[i]]]
            clipped, box, why = checks.prepare_segmentation(polygons, int(h[i]), int(w[i]))
            if why is not None:
                reason[i] = CODE[why]
                continue
            mask_box[i] = box
            first[i], count[i] = rows + len(extra_bounds), len(clipped)
            for p in clipped:
                start = base + len(extra_coords)
                extra_coords += p
                extra_bounds.append((start, base + len(extra_coords)))
        coords = np.concatenate([coords, np.array(extra_coords, dtype=np.float64)])
        bounds = np.concatenate([bounds, np.array(extra_bounds, dtype=np.int64).reshape(-1, 2)])
        return coords, bounds, first, count

    def _prepare_boxes(self, reason: np.ndarray, mask_box: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Return xyxy boxes clipped to the image (from the mask where bbox is absent), setting skip codes
        where the per-annotation box check would skip (only for annotations whose masks passed)."""
        n = len(reason)
        raw = _np(self.box, np.float64).reshape(-1, 4)
        state = _np(self.box_state, np.int8)
        ok = reason == 0
        bad_state = ok & (state > 0)
        reason[bad_state] = state[bad_state]
        given = ok & (state == _BOX_GIVEN)
        nonfinite = given & ~np.isfinite(raw).all(axis=1)
        reason[nonfinite] = CODE[checks.NON_FINITE]
        given &= ~nonfinite
        zero = given & ((raw[:, 2] <= 0) | (raw[:, 3] <= 0))
        reason[zero] = CODE[checks.ZERO_AREA_BOX]
        given &= ~zero
        with np.errstate(invalid="ignore"):
            xyxy = np.where(given[:, None], np.concatenate([raw[:, :2], raw[:, :2] + raw[:, 2:]], axis=1), mask_box)
        x1, x2 = np.minimum(np.maximum(xyxy[:, 0], 0.0), w), np.minimum(np.maximum(xyxy[:, 2], 0.0), w)
        y1, y2 = np.minimum(np.maximum(xyxy[:, 1], 0.0), h), np.minimum(np.maximum(xyxy[:, 3], 0.0), h)
        with np.errstate(invalid="ignore"):
            empty = (reason == 0) & ((x2 <= x1) | (y2 <= y1))
        reason[empty] = CODE[checks.EMPTY_MASK]
        return np.stack([x1, y1, x2, y2], axis=1)

    def _prepare_keypoints(self, order: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """Return [R, K, 3] keypoints of the records `order` as the per-annotation loader made them,
        and the number of malformed ones (not 3K finite numbers), used without keypoints."""
        out = np.zeros((len(order), k, 3), dtype=np.float32)
        if not k or not len(order):
            return out, 0
        state = _np(self.kp_state, np.int8)[order]
        ends = _np(self.kp_end, np.int64)
        starts = np.concatenate([[0], ends[:-1]])[order]
        lengths = ends[order] - starts
        good = (state == _KP_VALUES) & (lengths == 3 * k)
        values = _np(self.kp_values, np.float64)
        points = values[_ranges(starts[good], lengths[good])].reshape(-1, k, 3)
        finite = np.isfinite(points).all(axis=(1, 2))
        bad = int((state == _KP_BAD).sum() + ((state == _KP_VALUES) & ~good).sum() + (~finite).sum())
        points = points[finite].astype(np.float32)
        labelled = points[:, :, 2] > 0
        kept = np.zeros_like(points)
        kept[labelled] = points[labelled]
        kept[..., :2][labelled] += 0.5  # pixel indices to pixel centres, as the per-annotation loader does
        out[np.flatnonzero(good)[finite]] = kept
        return out, bad


def _check_polygon_chunk(coords: np.ndarray, bounds: np.ndarray, anns: np.ndarray, first: np.ndarray,
                         count: np.ndarray, reason: np.ndarray, mask_box: np.ndarray, h: np.ndarray,
                         w: np.ndarray) -> list[int]:
    """Check the polygons of `anns` (consecutive annotations that have polygons, so their coordinates are
    one contiguous run); set skip codes and mask extents; return the annotations that need clipping."""
    r0, r1 = first[anns[0]], first[anns[-1]] + count[anns[-1]]
    c0 = bounds[r0, 0]
    pts = coords[c0:bounds[r1 - 1, 1]].reshape(-1, 2)
    starts = (bounds[r0:r1, 0] - c0) // 2  # each polygon's first point in pts
    sizes = (bounds[r0:r1, 1] - bounds[r0:r1, 0]) // 2
    ann_rows = first[anns] - r0  # each annotation's first polygon, among these rows
    ann_starts = starts[ann_rows]  # ... and first point
    ann_sizes = np.add.reduceat(sizes, ann_rows)
    hh, ww = h[anns].astype(np.float64), w[anns].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.logical_and.reduceat(np.isfinite(pts).all(axis=1), ann_starts)
        # Inside the window one image size around the image, where `coco_checks._clip_polygon` leaves
        # polygons alone.
        margin = np.maximum(hh, ww)
        lo, x_hi, y_hi = (np.repeat(v, ann_sizes) for v in (-margin, ww + margin, hh + margin))
        inside = (pts[:, 0] >= lo) & (pts[:, 1] >= lo) & (pts[:, 0] <= x_hi) & (pts[:, 1] <= y_hi)
        inside = np.logical_and.reduceat(inside, ann_starts)
        x1, y1 = np.minimum.reduceat(pts[:, 0], ann_starts), np.minimum.reduceat(pts[:, 1], ann_starts)
        x2, y2 = np.maximum.reduceat(pts[:, 0], ann_starts), np.maximum.reduceat(pts[:, 1], ann_starts)
        collinear = np.logical_and.reduceat(_collinear_polygons(pts, starts, sizes), ann_rows)
    reason[anns[~finite]] = CODE[checks.NON_FINITE]
    plain = finite & inside
    empty = plain & (collinear | (x2 <= 0) | (y2 <= 0) | (x1 >= ww) | (y1 >= hh))
    reason[anns[empty]] = CODE[checks.EMPTY_MASK]
    good = plain & ~empty
    mask_box[anns[good]] = np.stack([x1, y1, x2, y2], axis=1)[good]
    return anns[finite & ~inside].tolist()


def _collinear_polygons(pts: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Return, per polygon, whether all its points lie on one line, as `polygons.collinear` computes it:
    the same float operations on the offsets from the first point, so the verdicts are identical."""
    n = len(pts)
    d = pts - np.repeat(pts[starts], sizes, axis=0)
    index = np.where(np.abs(d).sum(axis=1) != 0, np.arange(n), n)
    first = np.minimum.reduceat(index, starts)  # each polygon's first point away from its first point
    coincide = first == n
    v = np.repeat(d[np.minimum(first, n - 1)], sizes, axis=0)
    bent = np.logical_or.reduceat(v[:, 0] * d[:, 1] - v[:, 1] * d[:, 0] != 0, starts)
    return coincide | ~bent


def _np(buffer: array, dtype: Any) -> np.ndarray:
    """Return a numpy view of an `array` buffer (an empty array for an empty one)."""
    return np.frombuffer(buffer, dtype=dtype) if len(buffer) else np.zeros(0, dtype=dtype)


def _lookup(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (position of each value in `keys`, whether it is there); `keys` need not be sorted."""
    if not len(keys):
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    order = np.argsort(keys, kind="stable")
    at = np.minimum(np.searchsorted(keys[order], values), len(keys) - 1)
    return order[at], keys[order][at] == values


def _offsets(counts: np.ndarray) -> np.ndarray:
    """Return [0, c0, c0 + c1, ...] as int64."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Return the concatenation of arange(s, s + c) for each start s and count c."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - counts), counts) + np.arange(total)
