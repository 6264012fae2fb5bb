"""InstanceMasks (per-instance crops) against the dense [N, H, W] path they replace: pixel for pixel through
every operation, and mask targets equal to RoIAlign on the full masks, through the whole augmentation
pipeline, on the shapes generator and on polygon / RLE / crowd annotations.

The dense reference here is the code the training path ran before (a821b39): flips, quarter turns and
crops of the full tensor, nearest interpolation of its float copy, RoIAlign of the whole [N, 1, H, W].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

from maskrcnn.data import augment as augment_module
from maskrcnn.data import transforms
from maskrcnn.data.augment import Augmenter, CropSpec
from maskrcnn.data.coco import CocoDataset, _decode_masks
from maskrcnn.data.shapes import make_shapes
from maskrcnn.instance_masks import InstanceMasks, as_instance_masks
from maskrcnn.modeling.mask_rcnn import MaskRCNN, resized_shape

# pycocotools' decode (the dense reference) trips a harmless NumPy 2 DeprecationWarning.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ---- the dense reference ---------------------------------------------------------------------------


def dense_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of dense masks, one mask at a time (zero box when empty)."""
    out = torch.zeros((len(masks), 4))
    for n, m in enumerate(masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys):
            out[n] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return out


def dense_targets(masks: torch.Tensor, matched: torch.Tensor, boxes: torch.Tensor, size: int = 28) -> torch.Tensor:
    """Mask targets as the dense path computed them: RoIAlign over the whole [N, 1, H, W] float masks."""
    if len(boxes) == 0:
        return torch.zeros((0, size, size))
    rois = torch.cat([matched[:, None].float(), boxes], dim=1)
    return (roi_align(masks[:, None].float(), rois, (size, size), 1.0, 0, aligned=True)[:, 0] >= 0.5).float()


def dense_resize(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].to(torch.uint8)


def _masks_only(transform):
    """The transform as it was: boxes and keypoints by today's code, masks by the dense tensor operation."""
    dense_op = {"hflip": lambda m: m.flip(-1), "vflip": lambda m: m.flip(-2)}[transform.__name__]

    def old(image, target, flip_map=None):
        out_image, out = transform(image, {k: v for k, v in target.items() if k != "masks"}, flip_map)
        out["masks"] = dense_op(target["masks"])
        return out_image, out
    return old


def old_rot90(image, target, k=1):
    out_image, out = transforms.rot90(image, {k_: v for k_, v in target.items() if k_ != "masks"}, k)
    out["masks"] = torch.rot90(target["masks"], k, dims=(-2, -1))
    return out_image, out


def old_crop(image, target, top, left, height, width, min_visible_area_px=0.0, min_visible_fraction=0.0):
    """The dense crop: visible areas by summing the full masks, boxes from the cut masks."""
    out = dict(target)
    masks = target["masks"]
    before = masks.flatten(1).sum(dim=1)
    masks = masks[:, top: top + height, left: left + width]
    after = masks.flatten(1).sum(dim=1)
    keep = after > 0
    cut = (after < min_visible_area_px) | (after < min_visible_fraction * before.clamp(min=1))
    out["labels"] = target["labels"][keep]
    out["masks"] = masks[keep]
    out["boxes"] = dense_boxes(out["masks"])
    out["iscrowd"] = (target["iscrowd"].bool() | cut)[keep].to(target["iscrowd"].dtype)
    return image[:, top: top + height, left: left + width], out


def random_dense_masks(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Blobs of random size and density, some touching the image's edges, one left empty."""
    masks = torch.zeros((n, h, w), dtype=torch.uint8)
    for i in range(n - 1):
        bh, bw = (int(torch.randint(1, s + 1, (), generator=gen)) for s in (h // 2, w // 2))
        y = int(torch.randint(-2, h - bh + 3, (), generator=gen))
        x = int(torch.randint(-2, w - bw + 3, (), generator=gen))
        block = (torch.rand(bh, bw, generator=gen) < 0.7).to(torch.uint8)
        y0, x0 = max(y, 0), max(x, 0)
        masks[i, y0: y + bh, x0: x + bw] = block[y0 - y: h - y, x0 - x: w - x]
    return masks


def random_rois(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """xyxy boxes of all sizes, some reaching outside the image, fractional coordinates."""
    a = torch.rand(n, 2, generator=gen) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    size = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) + 0.3
    return torch.cat([a, a + size], dim=1)


# ---- each operation, pixel for pixel -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_every_operation_equals_the_dense_one(seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = 23 + seed * 7, 31 + seed * 5
    dense = random_dense_masks(gen, 6, h, w)
    masks = InstanceMasks.from_dense(dense)
    assert torch.equal(masks.to_dense(), dense)
    assert masks.pixels.numel() < dense.numel()  # crops, not the image per instance
    assert torch.equal(masks.area(), dense.flatten(1).sum(dim=1))
    assert torch.equal(masks.boxes(), dense_boxes(dense))
    assert torch.equal(masks.hflip().to_dense(), dense.flip(-1))
    assert torch.equal(masks.vflip().to_dense(), dense.flip(-2))
    turned, expected = masks, dense
    for _ in range(4):
        turned, expected = turned.rot90(), torch.rot90(expected, 1, dims=(-2, -1))
        assert turned.shape == expected.shape and torch.equal(turned.to_dense(), expected)
    for top, left, ch, cw in [(0, 0, h, w), (3, 5, 10, 12), (h - 4, w - 6, 4, 6), (1, 2, h - 1, 7)]:
        assert torch.equal(masks.crop(top, left, ch, cw).to_dense(), dense[:, top: top + ch, left: left + cw])
    for size in [(h, w), (2 * h, 2 * w), (h * 3 // 2 + 1, w * 5 // 3), (h // 2, w // 3), (7, 200), (h + 1, w - 1)]:
        assert torch.equal(masks.resize(*size).to_dense(), dense_resize(dense, size)), size
    keep = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(masks[keep].to_dense(), dense[keep])
    assert torch.equal(masks[torch.tensor([4, 0])].to_dense(), dense[[4, 0]])
    assert torch.equal(masks[1:4].to_dense(), dense[1:4])
    np.testing.assert_array_equal(masks[2], dense[2].bool().numpy())


@pytest.mark.parametrize("seed", range(4))
def test_roi_targets_equal_roi_align_on_the_full_masks(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    h, w = 40 + 9 * seed, 57 - 5 * seed
    dense = random_dense_masks(gen, 7, h, w)
    masks = InstanceMasks.from_dense(dense)
    boxes = torch.cat([masks.boxes(), random_rois(gen, 60, h, w)])  # the GT boxes join as RoIs in training
    matched = torch.cat([torch.arange(7), torch.randint(0, 7, (60,), generator=gen)])
    # Larger RoIs sample several points per bin (adaptive sampling): include some.
    boxes[-5:] = torch.tensor([[-3.5, -2.0, w + 1.5, h + 4.0]])
    for size in (28, 14):
        assert torch.equal(masks.roi_targets(matched, boxes, size), dense_targets(dense, matched, boxes, size))
    assert masks.roi_targets(matched[:0], boxes[:0], 28).shape == (0, 28, 28)


def test_dense_input_is_accepted_where_masks_enter():
    dense = torch.zeros((2, 8, 9), dtype=torch.bool)
    dense[0, 1:3, 2:6] = True
    assert as_instance_masks(dense).boxes().tolist() == [[2, 1, 6, 3], [0, 0, 0, 0]]
    assert as_instance_masks(dense.float() * 0.7).area().tolist() == [8, 0]  # floats: foreground from 0.5
    masks = as_instance_masks(dense.numpy())
    assert as_instance_masks(masks) is masks
    with pytest.raises(TypeError, match="InstanceMasks or an"):
        as_instance_masks([[0, 1]])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        as_instance_masks(torch.zeros(8, 9))
    with pytest.raises(TypeError, match="one index"):
        masks[0, 1, 2]
    with pytest.raises(ValueError, match="outside the 8x9 image"):
        InstanceMasks(torch.zeros(4, dtype=torch.uint8), torch.tensor([[7, 0, 2, 2]]), 8, 9)


# ---- annotations: polygons, RLE, crowd, the shapes generator -------------------------------------------


def _write(root: Path, images: list[tuple[int, int]], annotations: list[dict]) -> tuple[Path, Path]:
    image_dir = root / "images"
    image_dir.mkdir()
    entries = []
    for i, (h, w) in enumerate(images, start=1):
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(image_dir / f"{i}.png")
        entries.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
    data = {"images": entries, "annotations": [{"id": k, **a} for k, a in enumerate(annotations, start=1)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json", image_dir


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    if compressed:
        return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0] + counts if flat[0] else counts}


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """Polygons with decimal coordinates (pycocotools rounds x.1 / x.3 at fifths of a pixel), several
    parts, vertices outside the image; compressed and uncompressed RLE; crowd regions."""
    h, w = 37, 45
    blob = np.zeros((h, w), np.uint8)
    blob[0:9, 30:45] = 1  # touching the top and right edges
    blob[5:12, 38:41] = 0
    crowd = np.zeros((h, w), np.uint8)
    crowd[20:37, 0:45:2] = 1  # stripes: many runs
    anns = [
        {"image_id": 1, "category_id": 1, "segmentation": [[3.1, 2.3, 17.7, 4.1, 12.5, 19.9, 2.2, 14.6]]},
        {"image_id": 1, "category_id": 2, "segmentation": [[20.1, 20.3, 26.9, 20.1, 26.9, 26.7],
                                                            [28.3, 28.1, 33.1, 28.3, 30.7, 35.9]]},
        {"image_id": 1, "category_id": 1, "segmentation": [[-5.5, 30.2, 8.4, 25.1, 9.9, 45.0, -3.0, 41.3]]},
        {"image_id": 1, "category_id": 2, "segmentation": _rle(blob, compressed=True)},
        {"image_id": 1, "category_id": 1, "segmentation": _rle(crowd, compressed=False), "iscrowd": 1},
        {"image_id": 2, "category_id": 1, "segmentation": [[0.1, 0.1, 19.9, 0.1, 19.9, 11.9, 0.1, 11.9]]},
        {"image_id": 2, "category_id": 2, "segmentation": _rle(np.pad(np.ones((3, 3), np.uint8), ((9, 0), (17, 0))),
                                                               compressed=False), "iscrowd": 1},
    ]
    return _write(tmp_path_factory.mktemp("annotated"), [(h, w), (12, 20)], anns)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The shapes generator: basic shapes (RLE) on 48..80-px images, up to 4 an image."""
    return make_shapes(tmp_path_factory.mktemp("gen"), num_train=8, num_val=0, seed=3,
                       image_size=(48, 80), max_shapes=4, shape_size=(8, 30))["train"]


def _datasets(annotated, generated) -> list[CocoDataset]:
    return [CocoDataset(*annotated), CocoDataset(*generated)]


def _dense_ground_truth(ds: CocoDataset, index: int) -> torch.Tensor:
    """The dataset's masks as the dense path decoded them: pycocotools, whole image, one per annotation."""
    anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=ds.image_ids[index]))
    return torch.from_numpy(np.stack([ds.coco.annToMask(a) for a in anns]))


def test_dataset_masks_are_pycocotools_pixels_as_crops(annotated, generated):
    for ds in _datasets(annotated, generated):
        for i in range(len(ds)):
            _, target = ds[i]
            masks, expected = target["masks"], _dense_ground_truth(ds, i)
            assert isinstance(masks, InstanceMasks) and torch.equal(masks.to_dense(), expected)
            # each crop is its mask's tight extent
            assert torch.equal(masks.regions[:, 2:], (masks.boxes()[:, 2:] - masks.boxes()[:, :2]).long()[:, [1, 0]])
    _, target = CocoDataset(*annotated)[0]
    assert target["iscrowd"].tolist() == [0, 0, 0, 0, 1]


def test_decoding_a_dense_scene_never_holds_the_image_per_instance():
    h = w = 1024
    polygons = [[[x + 0.3, y + 0.2, x + 9.6, y + 0.2, x + 9.6, y + 9.8, x + 0.3, y + 9.8]]
                for y in range(0, 1000, 14) for x in range(0, 1000, 14)]
    masks = _decode_masks(polygons, h, w)
    assert len(masks) == len(polygons) == 72 * 72
    assert masks.pixels.numel() <= len(polygons) * 10 * 10  # 5184 crops of at most 10 x 10, not 5 GB
    for i in (0, 77, 5183):  # the pixels pycocotools gives the whole image
        whole = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons[i], h, w)))
        np.testing.assert_array_equal(masks[i], whole.astype(bool))
    small = masks.resize(800, 800).crop(100, 100, 512, 512).hflip().rot90()
    assert small.pixels.numel() < masks.pixels.numel()


# ---- the whole training pipeline, old against new -------------------------------------------------------


PIPELINES = [
    Augmenter(horizontal_flip=0.5),
    Augmenter(horizontal_flip=0.5, vertical_flip=0.5, rotate90=0.7),
    Augmenter(horizontal_flip=0.5, vertical_flip=0.5, rotate90=0.5,
              crop=CropSpec("relative_range", [0.4, 1.0], min_visible_area_px=20, min_visible_fraction=0.3)),
    Augmenter(crop=CropSpec("absolute", [24, 30], min_visible_fraction=0.5), rotate90=0.5),
]


def _old_augment(monkeypatch, augmenter: Augmenter, image, target, seed: int):
    """Run `augmenter` with the dense transforms patched in (the same random draws)."""
    with monkeypatch.context() as m:
        m.setattr(augment_module, "hflip", _masks_only(transforms.hflip))
        m.setattr(augment_module, "vflip", _masks_only(transforms.vflip))
        m.setattr(augment_module, "rot90", old_rot90)
        m.setattr(augment_module, "crop", old_crop)
        torch.manual_seed(seed)
        return augmenter(image, target)


@pytest.mark.parametrize("pipeline", range(len(PIPELINES)))
def test_full_pipeline_old_and_new_give_the_same_targets(monkeypatch, annotated, generated, pipeline):
    """Dataset -> augmentation -> the model's resize (scale jitter) -> mask targets, sample by sample."""
    augmenter = PIPELINES[pipeline]
    compared = 0
    for ds in _datasets(annotated, generated):
        for i in range(len(ds)):
            image, target = ds[i]
            dense_target = {**target, "masks": _dense_ground_truth(ds, i)}
            for seed in range(3):
                old_image, old = _old_augment(monkeypatch, augmenter, image, dense_target, seed)
                torch.manual_seed(seed)
                new_image, new = augmenter(image, target)
                assert torch.equal(old_image, new_image)
                for key in ("boxes", "labels", "iscrowd"):
                    assert torch.equal(old[key], new[key]), key
                assert torch.equal(old["masks"], new["masks"].to_dense())

                # The model's resize with a jittered shorter side, as in training.
                h, w = new_image.shape[-2:]
                size = resized_shape(h, w, 64 + 17 * seed + i, 200)[:2]
                old_masks = dense_resize(old["masks"], size)
                resized = MaskRCNN._resize_target(new, (h, w), size)
                assert torch.equal(resized["masks"].to_dense(), old_masks)

                # Mask targets of GT-box RoIs (as the RoI heads add them) and of jittered RoIs.
                gen = torch.Generator().manual_seed(seed)
                gt_boxes = resized["boxes"]
                n = len(gt_boxes)
                if n == 0:
                    continue
                jitter = gt_boxes + (torch.rand(n, 4, generator=gen) - 0.5) * 6
                boxes = torch.cat([gt_boxes, jitter, random_rois(gen, 8, *size)])
                matched = torch.cat([torch.arange(n), torch.arange(n), torch.randint(0, n, (8,), generator=gen)])
                assert torch.equal(resized["masks"].roi_targets(matched, boxes, 28),
                                   dense_targets(old_masks, matched, boxes))
                compared += 1
    assert compared >= 20


def test_every_box_encloses_its_mask_after_augmentation(annotated, generated):
    augmenter = PIPELINES[2]
    for ds in _datasets(annotated, generated):
        for i in range(len(ds)):
            image, target = ds[i]
            for seed in range(4):
                torch.manual_seed(seed)
                _, out = augmenter(image, target)
                for box, mask in zip(out["boxes"].tolist(), out["masks"].to_dense()):
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    assert len(ys) and box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
