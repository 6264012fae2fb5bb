"""COCO-format instance segmentation datasets: checked loading, contiguous labels, masks, flips.

The annotation file is parsed into arrays by `coco_table` (cached by content); what a file must hold
and which annotations are skipped is decided in `coco_checks`.
"""

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
from pycocotools.coco import COCO
from torch.utils.data import ConcatDataset, Dataset

from maskrcnn.data.augment import Augmenter
from maskrcnn.data.coco_checks import check_schema, load_annotation_file
from maskrcnn.data.coco_table import load_table
from maskrcnn.data.image_io import DEFAULT_MAX_PIXELS, image_to_tensor, read_image
from maskrcnn.data.transforms import keypoint_flip_map
from maskrcnn.errors import UserError
from maskrcnn.instance_masks import InstanceMasks
from maskrcnn.rle import rle_crop, rle_from_polygons

logger = logging.getLogger(__name__)



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
            data = load_annotation_file(self.ann_file)
            check_schema(data, self.ann_file, max_pixels=2**63)
            self._coco = _make_coco(data)
        return self._coco

    def _image_records(self, index: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Return image `index`'s info (id, file_name, height, width) and its records: dicts with box
        (xyxy), label, iscrowd, segmentation (pycocotools polygons or RLE) and keypoints [K, 3]."""
        position = int(self._positions[index])
        return self._table.image_info(position), self._table.records(position)

    def __len__(self) -> int:
        return len(self._positions)

    def object_boxes(self) -> list[np.ndarray]:
        """Return, per image, the [N, 2] widths and heights of its non-crowd objects (image pixels)."""
        t = self._table
        out = []
        for p in self._positions.tolist():
            rows = slice(int(t.record_offsets[p]), int(t.record_offsets[p + 1]))
            boxes = t.boxes[rows][t.iscrowd[rows] == 0]
            out.append(boxes[:, 2:] - boxes[:, :2])
        return out

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


def _decode_masks(segmentations: list[Any], h: int, w: int) -> InstanceMasks:
    """Return the masks of polygons or RLEs prepared by `coco_checks.prepare_segmentation`, each cropped to its extent.

    Never an [N, H, W] array: each instance becomes pycocotools' RLE (polygons are rasterised by
    pycocotools, as before, so the pixels are the same), and only the columns its runs cover are
    expanded, then cut to the rows they cover.
    """
    crops, origins = [], []
    for seg in segmentations:
        rle = rle_from_polygons(seg, h, w) if isinstance(seg, list) else seg
        crop, origin = rle_crop(rle["counts"], h)
        crops.append(crop)
        origins.append(origin)
    return InstanceMasks.from_crops(crops, origins, h, w)


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

    def object_boxes(self) -> list[np.ndarray]:
        """Return, per image of every dataset, the [N, 2] widths and heights of its non-crowd objects."""
        return [b for d in self.datasets for b in d.object_boxes()]


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
