"""COCO-format instance segmentation datasets: checked loading, contiguous labels, masks, flips."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import ConcatDataset, Dataset

from maskrcnn.data.image_io import DEFAULT_MAX_PIXELS, image_to_tensor, read_image
from maskrcnn.data.augment import Augmenter
from maskrcnn.data.jsonfile import load_json
from maskrcnn.data.transforms import keypoint_flip_map
from maskrcnn.errors import UserError
from maskrcnn.instance_masks import InstanceMasks

logger = logging.getLogger(__name__)

# Why an annotation was skipped, as shown in the one-line summary per dataset.
ZERO_AREA_BOX = "zero-area box"
SHORT_POLYGON = "polygon with < 3 points"
EMPTY_MASK = "empty mask or outside the image"
NO_SEGMENTATION = "no segmentation"
BAD_SEGMENTATION = "malformed segmentation"
SIZE_MISMATCH = "mask size differs from the image"
NON_FINITE = "non-finite coordinates"
BAD_BOX = "malformed bbox"
BAD_RLE = "RLE counts that do not cover the image"


def parse_data_spec(spec: str) -> tuple[Path, Path]:
    """Return (annotation file, image directory) from an `ANN.json:IMAGE_DIR` string."""
    text = str(spec).strip()
    cut = text.lower().find(".json:")
    if cut >= 0:  # split after ".json" so Windows drive letters ("C:\...") survive
        ann, image_dir = text[: cut + 5], text[cut + 6 :]
    elif ":" in text:
        ann, image_dir = text.rsplit(":", 1)
    else:
        ann, image_dir = "", ""
    if not ann or not image_dir:
        raise UserError(f"data spec '{spec}' must look like ANN.json:IMAGE_DIR (e.g. data/train.json:data/train)")
    return Path(ann), Path(image_dir)


class CocoDataset(Dataset):
    """A COCO-format dataset; `ds[i]` is (image float [3,H,W] in 0..1, target dict)."""

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        filter_empty: bool = True,
        train: bool = False,
        flip_prob: float = 0.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_keypoints: int = 1,
        augment: Augmenter | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        """`min_keypoints`: with `filter_empty` and `train`, a keypoint dataset's images with fewer
        labelled keypoints (all instances together) are left out, as Detectron2 does. `augment`: the
        training augmentation (with `train`); without it, a horizontal flip with chance `flip_prob`.
        `cache_dir`: keep the parsed annotations there, keyed by the file's content (`coco_table`)."""
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.train = train
        self.flip_prob = float(flip_prob)
        self.max_pixels = max_pixels
        if not self.image_dir.is_dir():
            raise UserError(f"image directory '{self.image_dir}' (for '{self.ann_file}') does not exist")

        # Imported here: coco_table builds on this module's checks (and imports it at its top).
        from maskrcnn.data.coco_table import load_table

        table = load_table(self.ann_file, cache_dir)
        table.check_pixels(self.ann_file, max_pixels)
        self._table = table
        self.category_ids: list[int] = list(table.meta["category_ids"])
        self.class_names: list[str] = list(table.meta["class_names"])
        # Person-keypoints files: each keypoint category names its K keypoints and a skeleton.
        self.keypoint_names: list[str] = list(table.meta["keypoint_names"])
        self.skeleton: list[list[int]] = [list(p) for p in table.meta["skeleton"]]  # 1-based, as COCO's
        self.num_keypoints = len(self.keypoint_names)
        self.keypoint_flip_map: list[int] = keypoint_flip_map(self.keypoint_names)
        augment = augment if augment is not None else Augmenter(horizontal_flip=self.flip_prob)
        # Flips need to know which keypoints mirror which: this dataset's own names tell (a copy, so
        # one Augmenter can serve several datasets).
        self.augment = augment if augment.flip_map is not None else replace(augment, flip_map=self.keypoint_flip_map)

        self.skipped: Counter[str] = Counter(table.meta["skipped"])
        self.bad_keypoints: int = table.meta["bad_keypoints"]
        self.boxes_from_masks: int = table.meta["boxes_from_masks"]
        # Keypoint files' training images need min_keypoints labelled keypoints (as Detectron2's).
        self._positions = table.usable_images(filter_empty, min_keypoints if train else 0)
        self.image_ids: list[int] = table.image_ids[self._positions].tolist()
        self.image_sizes: list[tuple[int, int]] = list(zip(table.heights[self._positions].tolist(),
                                                           table.widths[self._positions].tolist()))
        self._coco: COCO | None = None

        num_images = len(table.image_ids)
        self._report(table.meta["num_annotations"], num_images)
        if self.bad_keypoints:
            logger.warning(f"{self.ann_file}: {self.bad_keypoints} annotations have malformed keypoints (not "
                           f"{3 * self.num_keypoints} finite numbers); they are used without keypoints")
        if not len(self._positions):
            what = "no images" if not num_images else "no image with a usable (non-crowd) annotation"
            raise UserError(f"annotation file '{self.ann_file}' has {what}; check its images and annotations")

    @property
    def coco(self) -> COCO:
        """The pycocotools index of the whole file, for evaluation: built on first use (it holds every
        annotation as Python objects, which training does not need)."""
        if self._coco is None:
            data = _load_json(self.ann_file)
            _check_schema(data, self.ann_file, max_pixels=2**63)
            self._coco = _make_coco(data)
        return self._coco

    def _image_records(self, index: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Return image `index`'s info (id, file_name, height, width) and its records: dicts with box
        (xyxy), label, iscrowd, segmentation (pycocotools polygons or RLE) and keypoints [K, 3]."""
        position = int(self._positions[index])
        return self._table.image_info(position), self._table.records(position)

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info, records = self._image_records(index)
        path = self.image_dir / info["file_name"]
        image = read_image(path, self.max_pixels)
        h, w = int(info["height"]), int(info["width"])
        if image.shape[:2] != (h, w):
            raise UserError(
                f"image '{path}' is {image.shape[1]}x{image.shape[0]} but '{self.ann_file}' says {w}x{h}; "
                "fix the annotation file (or re-save the image without EXIF rotation)"
            )
        masks = _decode_masks([r["segmentation"] for r in records], h, w)
        # Rare shapes pass the cheap checks yet rasterise to nothing (e.g. a sliver between pixels).
        keep = masks.area() > 0
        records = [r for r, k in zip(records, keep.tolist()) if k]
        target = {
            "boxes": torch.tensor([r["box"] for r in records], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([r["label"] for r in records], dtype=torch.int64),
            "masks": masks[keep],
            "iscrowd": torch.tensor([r["iscrowd"] for r in records], dtype=torch.int64),
            "image_id": int(info["id"]),
            "file_name": str(path),
        }
        if self.num_keypoints:
            target["keypoints"] = torch.from_numpy(
                np.stack([r["keypoints"] for r in records]) if records else np.zeros((0, self.num_keypoints, 3))
            ).float()
        tensor = image_to_tensor(image)
        if self.train and self.augment.active:
            tensor, target = self.augment(tensor, target)
        return tensor, target

    def __repr__(self) -> str:
        return f"CocoDataset('{self.ann_file}', {len(self)} images, {len(self.class_names)} classes)"

    def _report(self, num_annotations: int, num_images: int) -> None:
        """Log one line summarising skipped annotations and derived boxes, if any."""
        if not self.skipped and not self.boxes_from_masks:
            return
        parts = [f"{n} {why}" for why, n in sorted(self.skipped.items())]
        msg = f"{self.ann_file}: skipped {sum(self.skipped.values())} of {num_annotations} annotations"
        msg += f" ({', '.join(parts)})" if parts else ""
        if self.boxes_from_masks:
            msg += f"; derived {self.boxes_from_masks} missing boxes from masks"
        logger.warning(msg + f"; {len(self)} of {num_images} images kept")


def _prepare_segmentation(seg: Any, h: int, w: int) -> tuple[Any, list[float], str | None]:
    """Return (segmentation ready for pycocotools, its xyxy extent, skip reason or None)."""
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return None, [], NO_SEGMENTATION
    if isinstance(seg, list):
        if not all(isinstance(p, list) for p in seg):
            return None, [], BAD_SEGMENTATION
        polygons = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None, [], SHORT_POLYGON
        if not all(isinstance(v, (int, float)) for p in polygons for v in p):
            return None, [], BAD_SEGMENTATION  # strings, nulls or nested lists among the coordinates
        points = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
        if not all(np.isfinite(p).all() for p in points):
            return None, [], NON_FINITE
        # pycocotools rasterises every pixel step along each edge, so a vertex at 1e12 would take
        # forever (and all memory): clip polygons that reach far outside the image to a window around it.
        points = [_clip_polygon(p, w, h) for p in points]
        points = [p for p in points if len(p) >= 3 and np.isfinite(p).all()]
        if not points:
            return None, [], EMPTY_MASK
        polygons = [p.reshape(-1).tolist() for p in points]
        allp = np.concatenate(points)
        x1, y1 = allp.min(axis=0)
        x2, y2 = allp.max(axis=0)
        # Collinear or all-outside polygons rasterise to an empty mask. (Not "zero shoelace area": a
        # figure-eight's two lobes cancel in the signed area, yet pycocotools fills both.)
        if all(_collinear(p) for p in points) or x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            return None, [], EMPTY_MASK
        return polygons, [float(x1), float(y1), float(x2), float(y2)], None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not isinstance(counts, (list, str, bytes)):
            return None, [], BAD_SEGMENTATION
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            return None, [], BAD_SEGMENTATION
        if [size[0], size[1]] != [h, w]:
            return None, [], SIZE_MISMATCH
        try:
            rle = rle_from_counts(counts, h, w)
        except RleCoverageError:
            return None, [], BAD_RLE
        except RleError:
            return None, [], BAD_SEGMENTATION
        area = int(mask_utils.area(rle))
        if area == 0:
            return None, [], EMPTY_MASK
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        return rle, [x, y, x + bw, y + bh], None
    return None, [], BAD_SEGMENTATION


def _collinear(points: np.ndarray) -> bool:
    """Return True if all points [P,2] lie on one line (or coincide): the polygon has no interior."""
    d = points[1:] - points[0]
    nonzero = np.flatnonzero(np.abs(d).sum(axis=1))
    if len(nonzero) == 0:
        return True
    v = d[nonzero[0]]
    return bool((v[0] * d[:, 1] - v[1] * d[:, 0] == 0).all())


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


def _clip_polygon(points: np.ndarray, w: int, h: int) -> np.ndarray:
    """Return the polygon [P,2] clipped to a window one image size around the image (unchanged if inside).

    Sutherland-Hodgman against each side in turn: exact geometry for any polygon and a convex
    window. pycocotools rounds vertices to 1/5 pixel, so a clipped polygon may differ from the
    unclipped one by a pixel along an edge; with the window this wide only absurd annotations
    (vertices more than an image size outside) are clipped at all.
    """
    margin = float(max(h, w))
    lo = np.array([-margin, -margin])
    hi = np.array([w + margin, h + margin])
    if (points >= lo).all() and (points <= hi).all():
        return points
    for axis, bound, keep_below in ((0, lo[0], False), (0, hi[0], True), (1, lo[1], False), (1, hi[1], True)):
        if len(points) == 0:
            break
        out = []
        prev = points[-1]
        for cur in points:
            cur_in = cur[axis] <= bound if keep_below else cur[axis] >= bound
            prev_in = prev[axis] <= bound if keep_below else prev[axis] >= bound
            if cur_in != prev_in:  # the edge crosses the line: add the crossing point
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(prev + t * (cur - prev))
            if cur_in:
                out.append(cur)
            prev = cur
        points = np.array(out, dtype=np.float64).reshape(-1, 2)
    return points


def _decode_masks(segmentations: list[Any], h: int, w: int) -> InstanceMasks:
    """Return the masks of polygons or RLEs prepared by `_prepare_segmentation`, each cropped to its extent.

    Never an [N, H, W] array: each instance becomes pycocotools' RLE (polygons are rasterised by
    pycocotools, as before, so the pixels are the same), and only the columns its runs cover are
    expanded, then cut to the rows they cover.
    """
    crops, origins = [], []
    for seg in segmentations:
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        counts = rle["counts"]
        crop, origin = _rle_crop(rle_counts(counts.encode("ascii") if isinstance(counts, str) else counts), h)
        crops.append(crop)
        origins.append(origin)
    return InstanceMasks.from_crops(crops, origins, h, w)


def _rle_crop(runs: list[int], h: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (uint8 crop, (top, left)) of the set pixels of column-major RLE `runs` of an h-row mask.

    Runs alternate background and foreground, starting with background. Only the band of columns the
    foreground runs touch is expanded (columns x h bytes), then trimmed to the rows that hold pixels.
    """
    ends = np.cumsum(np.asarray(runs, dtype=np.int64))
    starts, ends = (ends - np.asarray(runs, dtype=np.int64))[1::2], ends[1::2]  # foreground runs
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


# ---- loading and checking the JSON ------------------------------------------------------------


def _load_json(path: Path) -> dict[str, Any]:
    """Return the parsed annotation file, or raise UserError naming it."""
    return load_json(path, "annotation file")


def _require(entry: Any, keys: Sequence[str], where: str, path: Path) -> None:
    """Raise UserError unless `entry` is a JSON object with all `keys`."""
    if not isinstance(entry, dict):
        raise UserError(f"'{path}': {where} must be an object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise UserError(f"'{path}': {where} is missing '{key}'; every entry needs {', '.join(keys)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_top_level(data: Any, path: Path) -> None:
    """Raise UserError unless `data` has 'images' and 'categories' lists (setting absent annotations to [])."""
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a COCO object with 'images', 'annotations' and 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"'{path}' has no '{key}' list; is it a COCO instances file?")
    if data.get("annotations") is None:
        data["annotations"] = []  # image-info-only files (test sets) are fine
    if not isinstance(data["annotations"], list):
        raise UserError(f"'{path}': 'annotations' must be a list, got {type(data['annotations']).__name__}")


def _check_images(images: list, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[int, dict]:
    """Return the image entries by id after checking their keys and types."""
    by_id: dict[int, dict] = {}
    for i, img in enumerate(images):
        _require(img, ("id", "file_name", "width", "height"), f"images[{i}]", path)
        if not _is_int(img["id"]):
            raise UserError(f"'{path}': images[{i}] has id {img['id']!r}; image ids must be integers")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise UserError(f"'{path}': images[{i}] has file_name {img['file_name']!r}; expected a file name")
        w, h = img["width"], img["height"]
        if not (_is_int(w) and _is_int(h)) or min(w, h) < 1:
            raise UserError(
                f"'{path}': images[{i}] needs positive integer 'width' and 'height', got {w!r} and {h!r}"
            )
        if w * h > max_pixels:
            raise _too_many_pixels(path, i, img["file_name"], w, h, max_pixels)
        if img["id"] in by_id:
            raise UserError(f"'{path}': image id {img['id']} appears twice in 'images'")
        by_id[img["id"]] = img
    return by_id


def _too_many_pixels(path: Path, index: int, file_name: str, w: int, h: int, max_pixels: int) -> UserError:
    return UserError(
        f"'{path}': images[{index}] ('{file_name}') is {w}x{h} = {w * h} pixels, above the limit "
        f"of {max_pixels}; downscale it or raise input.max_pixels"
    )


def _check_categories(categories: list, path: Path) -> set[int]:
    """Return the category ids after checking the entries' keys and types."""
    seen: set[int] = set()
    for i, cat in enumerate(categories):
        _require(cat, ("id", "name"), f"categories[{i}]", path)
        if not _is_int(cat["id"]) or cat["id"] in seen:
            raise UserError(f"'{path}': categories[{i}] has a non-integer or repeated id {cat['id']!r}")
        if not isinstance(cat["name"], (str, int, float)) or isinstance(cat["name"], bool):
            raise UserError(f"'{path}': categories[{i}] has name {cat['name']!r}; expected a string")
        seen.add(cat["id"])
    if not seen:
        raise UserError(f"'{path}' lists no categories")
    return seen


def _check_annotation(ann: Any, i: int, path: Path) -> tuple[int, int, int | None, int]:
    """Return (image_id, category_id, id or None, iscrowd) of annotations[i] after checking their types.

    Whether the ids refer to listed images and categories, and are unique, is the caller's check
    (`_unknown_image`, `_unknown_category`, `_bad_annotation_id` word the errors).
    """
    _require(ann, ("image_id", "category_id"), f"annotations[{i}]", path)
    image_id, category_id, ann_id = ann["image_id"], ann["category_id"], ann.get("id")
    if not _is_int(image_id):
        raise _unknown_image(path, i, image_id)
    if not _is_int(category_id):
        raise _unknown_category(path, i, category_id)
    if ann_id is not None and not _is_int(ann_id):
        raise _bad_annotation_id(path, i, ann_id)
    crowd = ann.get("iscrowd", 0)
    if not (crowd is None or (isinstance(crowd, (int, float)) and crowd in (0, 1))):
        raise UserError(f"'{path}': annotations[{i}] has iscrowd {crowd!r}; expected 0 or 1")
    return image_id, category_id, ann_id, int(crowd or 0)


def _unknown_image(path: Path, i: int, image_id: Any) -> UserError:
    return UserError(f"'{path}': annotations[{i}] refers to image_id {image_id!r}, which is not in 'images'")


def _unknown_category(path: Path, i: int, category_id: Any) -> UserError:
    return UserError(f"'{path}': annotations[{i}] has category_id {category_id!r}, which is not in 'categories'")


def _bad_annotation_id(path: Path, i: int, ann_id: Any) -> UserError:
    return UserError(f"'{path}': annotations[{i}] has a non-integer or repeated id {ann_id!r}")


def _check_schema(data: Any, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[Any, dict]:
    """Return images by id after checking keys, types and references (filling ann ids and iscrowd)."""
    _check_top_level(data, path)
    images = _check_images(data["images"], path, max_pixels)
    categories = _check_categories(data["categories"], path)
    anns = data["annotations"]
    next_id = 1 + max((a["id"] for a in anns if isinstance(a, dict) and _is_int(a.get("id"))), default=0)
    ann_ids: set[int] = set()
    for i, ann in enumerate(anns):
        image_id, category_id, ann_id, ann["iscrowd"] = _check_annotation(ann, i, path)
        if image_id not in images:
            raise _unknown_image(path, i, image_id)
        if category_id not in categories:
            raise _unknown_category(path, i, category_id)
        if ann_id is None:  # pycocotools indexes annotations by id
            ann["id"], next_id = next_id, next_id + 1
        elif ann_id in ann_ids:
            raise _bad_annotation_id(path, i, ann_id)
        ann_ids.add(ann["id"])
    return images


def check_annotation_file(path: str | os.PathLike) -> None:
    """Raise UserError naming the problem unless `path` is a readable COCO instances file."""
    path = Path(path)
    _check_schema(_load_json(path), path, max_pixels=2**63)


def _make_coco(data: dict[str, Any]) -> COCO:
    """Return a pycocotools COCO index over already-loaded data, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---- several datasets ---------------------------------------------------------------------------


class ConcatCocoDataset(ConcatDataset):
    """Several CocoDatasets with the same categories, seen as one."""

    def __init__(self, datasets: Sequence[CocoDataset]) -> None:
        super().__init__(datasets)
        self.class_names: list[str] = list(datasets[0].class_names)
        self.category_ids: list[int] = list(datasets[0].category_ids)
        self.image_sizes: list[tuple[int, int]] = [s for d in datasets for s in d.image_sizes]
        self.keypoint_names: list[str] = list(datasets[0].keypoint_names)
        self.skeleton: list[list[int]] = list(datasets[0].skeleton)
        self.num_keypoints: int = datasets[0].num_keypoints
        self.keypoint_flip_map: list[int] = list(datasets[0].keypoint_flip_map)


def concat_datasets(datasets: Sequence[CocoDataset]) -> CocoDataset | ConcatCocoDataset:
    """Return one dataset over all `datasets`; raise UserError if their categories differ."""
    if not datasets:
        raise UserError("no datasets given; set data.train to one or more ANN.json:IMAGE_DIR specs")
    if len(datasets) == 1:
        return datasets[0]
    first = datasets[0]
    for d in datasets[1:]:
        if (d.category_ids != first.category_ids or d.class_names != first.class_names
                or d.keypoint_names != first.keypoint_names):
            raise UserError(
                f"'{d.ann_file}' and '{first.ann_file}' have different categories; datasets trained "
                "together must share the same category ids and names"
            )
    return ConcatCocoDataset(datasets)


def build_dataset(specs: str | Sequence[str], **kwargs: Any) -> CocoDataset | ConcatCocoDataset:
    """Return the dataset for one or several `ANN.json:IMAGE_DIR` specs (kwargs go to CocoDataset)."""
    if isinstance(specs, str):
        specs = [specs]
    return concat_datasets([CocoDataset(*parse_data_spec(s), **kwargs) for s in specs])
