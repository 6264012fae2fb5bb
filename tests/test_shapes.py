"""Synthetic shapes: deterministic, valid COCO, masks consistent with boxes, occlusion makes masks disjoint;
the fine style's rings have holes, crosses thin arms and stars five sharp points; the blobs style's
nuclei are many, bright on a dark background, soft-edged, with masks at their half-intensity contour."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn.cli import main
from maskrcnn.config import load_config
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.shapes import (
    CROSS, MIN_STROKE, MIN_VISIBLE_PIXELS, NUCLEUS, RING, STAR, _blob_opacity, _shape_mask, make_shapes,
    render_image, shape_categories,
)
from maskrcnn.errors import UserError
from maskrcnn.modeling import build_model

# pycocotools' decode trips a harmless NumPy 2 DeprecationWarning
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num_train=30, num_val=5, seed=7)
    return out


def test_layout_and_categories(shapes_dir):
    for split, n in (("train", 30), ("val", 5)):
        data = json.loads((shapes_dir / f"{split}.json").read_text())
        assert len(data["images"]) == n and len(list((shapes_dir / split).glob("*.png"))) == n
        assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "square"), (2, "circle"), (3, "triangle")]
        assert all(160 <= im["width"] <= 256 and 160 <= im["height"] <= 256 for im in data["images"])


def test_deterministic_for_a_seed(shapes_dir, tmp_path):
    make_shapes(tmp_path / "a", num_train=4, num_val=2, seed=7)
    make_shapes(tmp_path / "b", num_train=3, num_val=2, seed=8)
    first = json.loads((shapes_dir / "train.json").read_text())
    again = json.loads((tmp_path / "a" / "train.json").read_text())
    assert again["images"] == first["images"][:4]
    assert again["annotations"] == [a for a in first["annotations"] if a["image_id"] <= 4]
    assert (tmp_path / "a" / "train" / "000002.png").read_bytes() == (shapes_dir / "train" / "000002.png").read_bytes()
    val_a = json.loads((tmp_path / "a" / "val.json").read_text())
    val_b = json.loads((tmp_path / "b" / "val.json").read_text())
    val = json.loads((shapes_dir / "val.json").read_text())
    assert val_a["images"] == val["images"][:2]  # val does not depend on how many train images there are
    assert val_b["annotations"] != [a for a in val["annotations"] if a["image_id"] <= 2]


def test_masks_boxes_and_areas_consistent_and_disjoint(shapes_dir):
    data = json.loads((shapes_dir / "train.json").read_text())
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        mask = mask_utils.decode(ann["segmentation"])
        assert mask.sum() >= MIN_VISIBLE_PIXELS and ann["area"] == mask.sum() and ann["iscrowd"] == 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        by_image.setdefault(ann["image_id"], []).append(mask)
    assert len(by_image) == 30  # every image has at least one shape
    for masks in by_image.values():
        assert np.stack(masks).sum(axis=0).max() <= 1  # occlusion leaves no pixel in two masks
        assert len(masks) <= 4


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Grow a bool mask by `steps` pixels (4-neighbourhood)."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def test_occlusion_happens():
    touching = 0
    for i in range(40):
        image, shapes = render_image(np.random.default_rng(i), 120, 120, max_shapes=4, shape_size=(30, 70))
        assert image.shape == (120, 120, 3) and image.dtype == np.uint8
        masks = [m for _, m in shapes]
        assert np.stack(masks).sum(axis=0).max() <= 1
        # shapes that overlapped now share a boundary: one mask's 1-pixel dilation meets the other
        touching += any((_dilate(a) & b).any() for j, a in enumerate(masks) for b in masks[j + 1 :])
    assert touching >= 5


def test_loads_as_coco_dataset(shapes_dir):
    ds = CocoDataset(shapes_dir / "train.json", shapes_dir / "train")
    assert len(ds) == 30 and ds.class_names == ["square", "circle", "triangle"]
    image, target = ds[0]
    assert target["masks"].shape[1:] == image.shape[1:] and (target["labels"] >= 1).all()


def test_fixed_size_and_bad_arguments(tmp_path):
    make_shapes(tmp_path, num_train=2, num_val=0, seed=0, image_size=64)
    data = json.loads((tmp_path / "train.json").read_text())
    assert all(im["width"] == 64 == im["height"] for im in data["images"])
    with pytest.raises(UserError, match="image size"):
        make_shapes(tmp_path, 1, 1, 0, image_size=8)


def test_cli(tmp_path, capsys):
    assert main(["make-shapes", "--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "96"]) == 0
    out = capsys.readouterr().out
    assert "data.train=" in out and (tmp_path / "val.json").exists()
    assert main(["make-shapes", "--out", str(tmp_path), "--size", "4"]) == 2
    assert main(["make-shapes", "--out", str(tmp_path / "fine"), "--train", "1", "--val", "1", "--size", "64",
                 "--style", "fine"]) == 0
    assert "model.class_names=[ring,cross,star]" in capsys.readouterr().out
    assert json.loads((tmp_path / "fine" / "val.json").read_text())["categories"] == shape_categories("fine")
    assert main(["make-shapes", "--out", str(tmp_path), "--keypoints", "--style", "fine"]) == 2
    assert "model.num_classes" not in out  # the basic style's classes are the shapes preset's


# sha256 of train.json plus the decoded pixels of one image (not the PNG bytes, which depend on Pillow's
# zlib) of small datasets: it pins each style's output, which the demo, the ablations and the other tests
# rely on. The first was computed before the fine style was added, the others before the blobs style
# (with the default image and shape sizes). Change them only on purpose.
PINNED_DIGESTS = [
    ("basic", {"num_train": 3, "image_size": (48, 80)}, "0f4449c459b7fdab3ce131e735d937eb636f38c3ba3e704d66b4f7e42c537910"),
    ("basic", {"num_train": 2}, "fe6a9c132333578f47cd5b79405830645c0f89e5005f89c7abe006adbcd1b087"),
    ("fine", {"num_train": 3, "image_size": (48, 80)}, "cfef2431baaf2c698172edf245131cc410b934612912a2d0b792780d651538c8"),
    ("fine", {"num_train": 2}, "cdf1fc081fc107adc30e478eb3e649698f7d59e4cdd2e6d5cb292bb25d7bcb28"),
]


@pytest.mark.parametrize(("style", "kwargs", "digest"), PINNED_DIGESTS)
def test_style_output_is_pinned(tmp_path, style, kwargs, digest):
    make_shapes(tmp_path, num_val=1, seed=11, style=style, **kwargs)
    pixels = np.asarray(Image.open(tmp_path / "train" / "000002.png"))
    assert hashlib.sha256((tmp_path / "train.json").read_bytes() + pixels.tobytes()).hexdigest() == digest


@pytest.fixture(scope="module")
def fine_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fine")
    make_shapes(out, num_train=6, num_val=2, seed=3, image_size=96, style="fine")
    return out


def test_fine_style_writes_valid_coco(fine_dir):
    coco = COCO(str(fine_dir / "train.json"))
    cats = [(c["id"], c["name"], c["supercategory"]) for c in coco.loadCats(coco.getCatIds())]
    assert cats == [(1, "ring", "shape"), (2, "cross", "shape"), (3, "star", "shape")]
    assert coco.dataset["categories"] == shape_categories("fine")
    anns = coco.loadAnns(coco.getAnnIds())
    assert {a["category_id"] for a in anns} == {RING, CROSS, STAR} and len(coco.getImgIds()) == 6
    for ann in anns:
        image = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["area"] == coco.annToMask(ann).sum() >= MIN_VISIBLE_PIXELS
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert masks and np.stack(masks).sum(axis=0).max() <= 1


def test_fine_style_deterministic_for_a_seed(fine_dir, tmp_path):
    make_shapes(tmp_path / "same", num_train=6, num_val=2, seed=3, image_size=96, style="fine")
    make_shapes(tmp_path / "other", num_train=6, num_val=2, seed=4, image_size=96, style="fine")
    files = sorted(p.relative_to(fine_dir) for p in fine_dir.rglob("*") if p.is_file())
    assert len(files) == 2 + 6 + 2
    assert all((tmp_path / "same" / f).read_bytes() == (fine_dir / f).read_bytes() for f in files)
    assert (tmp_path / "other" / "train.json").read_bytes() != (fine_dir / "train.json").read_bytes()


def _offsets(side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets from the centre of the middle pixel of a side x side grid."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    return xx - (side // 2 + 0.5), yy - (side // 2 + 0.5)


@pytest.mark.parametrize("size", [10, 24, 48])
@pytest.mark.parametrize("proportion", [0.0, 0.5, 0.999])
def test_ring_has_a_hole(size, proportion):
    dx, dy = _offsets()
    mask = _shape_mask(RING, dx, dy, size, 0.3, "fine", proportion)
    c = dx.shape[0] // 2
    assert not mask[c, c] and mask.sum() > 0
    # thickness along a radius: 15..30% of the outer radius, never under MIN_STROKE pixels
    band = int(mask[c, c:].sum())
    assert max(0.15 * size / 2, MIN_STROKE) - 1 <= band <= max(0.30 * size / 2, MIN_STROKE) + 1


@pytest.mark.parametrize("size", [10, 40])
@pytest.mark.parametrize("proportion", [0.0, 0.999])
def test_cross_is_thin(size, proportion):
    dx, dy = _offsets()
    c = dx.shape[0] // 2
    upright = _shape_mask(CROSS, dx, dy, size, 0.0, "fine", proportion)
    ys, xs = np.nonzero(upright)
    assert upright[c, c] and 0 < upright.sum() < 0.5 * (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    # arm width, across the upper arm halfway out: 15..25% of the size, never under MIN_STROKE pixels
    arm = int(upright[c - size // 4].sum())
    assert max(0.15 * size, MIN_STROKE) - 1 <= arm <= max(0.25 * size, MIN_STROKE) + 1
    for angle in (0.4, np.pi / 4, 2.0):  # rotated, still well under its own bounding square
        assert 0 < _shape_mask(CROSS, dx, dy, size, angle, "fine", proportion).sum() < 0.5 * size * size


@pytest.mark.parametrize("angle", [0.0, 1.0, 2.5])
def test_star_has_five_sharp_points(angle):
    dx, dy = _offsets()
    size = 48
    mask = _shape_mask(STAR, dx, dy, size, angle, "fine")
    assert 0 < mask.sum() < 0.6 * np.pi * (size / 2) ** 2
    # a circle between the inner and outer radius crosses the five points: five runs inside the star
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    on_circle = _shape_mask(STAR, 0.7 * size / 2 * np.cos(t), 0.7 * size / 2 * np.sin(t), size, angle, "fine")
    assert np.count_nonzero(on_circle != np.roll(on_circle, 1)) == 10


def test_unknown_style(tmp_path):
    with pytest.raises(UserError, match=r"'round'.*basic, fine"):
        make_shapes(tmp_path / "out", 1, 1, style="round")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="'round'"):
        shape_categories("round")


@pytest.fixture(scope="module")
def blobs_dir(tmp_path_factory):
    """Two training images and one validation image of the blobs style at its defaults (512 px, 20..45 blobs)."""
    out = tmp_path_factory.mktemp("blobs")
    make_shapes(out, num_train=2, num_val=1, seed=5, style="blobs")
    return out


def _blob_images(root) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Return each training image's grey pixels with its decoded masks."""
    data = json.loads((root / "train.json").read_text())
    images = []
    for image in data["images"]:
        pixels = np.asarray(Image.open(root / "train" / image["file_name"]))
        assert pixels.ndim == 3 and (pixels == pixels[..., :1]).all()  # grey, stored as RGB
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in data["annotations"]
                 if a["image_id"] == image["id"]]
        images.append((pixels[..., 0].astype(float), masks))
    return images


def test_blobs_style_defaults_and_valid_coco(blobs_dir):
    coco = COCO(str(blobs_dir / "train.json"))
    assert coco.dataset["categories"] == shape_categories("blobs") == [
        {"id": NUCLEUS, "name": "nucleus", "supercategory": "cell"}]
    assert all(im["width"] == 512 == im["height"] for im in coco.dataset["images"])
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 20 <= len(anns) <= 45  # dense: many nuclei in every image
        masks = [coco.annToMask(a) for a in anns]
        assert np.stack(masks).sum(axis=0).max() <= 1  # every painted pixel in one annotation
        for ann, mask in zip(anns, masks):
            x, y, w, h = ann["bbox"]
            assert ann["category_id"] == NUCLEUS and ann["area"] == mask.sum() >= MIN_VISIBLE_PIXELS
            assert max(w, h) <= 41  # major axis 14..40 px, at pixel centres
    sides = [max(a["bbox"][2:]) for a in coco.loadAnns(coco.getAnnIds())]
    assert min(sides) < 20 and max(sides) > 30  # the sizes spread over the range


def test_blobs_are_dense():
    # each image tries at least the style's 20 blobs (of up to 25 here), and small blobs all find room
    counts = [len(render_image(np.random.default_rng(i), 192, 192, 25, (10, 14), "blobs")[1]) for i in range(12)]
    assert 20 <= min(counts) and max(counts) <= 25


def test_blobs_are_bright_on_dark_with_soft_edges(blobs_dir):
    for grey, masks in _blob_images(blobs_dir):
        inside = np.any(masks, axis=0)
        edge = _dilate(inside) & ~inside  # the pixels just outside a mask boundary
        background = ~_dilate(inside, 10)
        level_in, level_edge, level_out = grey[inside].mean(), grey[edge].mean(), grey[background].mean()
        assert 5 < level_out < 50 and level_in > level_out + 60
        # soft edges: neither background (a hard edge) nor blob, but in between
        assert level_out + 0.2 * (level_in - level_out) < level_edge < level_in - 0.2 * (level_in - level_out)
        assert 6 < grey[background].std() < 25  # pixel noise over a smooth background


@pytest.mark.parametrize(("size", "angle", "proportion"), [(14, 0.0, 0.0), (40, 0.7, 0.5), (40, 2.0, 0.999)])
def test_blob_mask_is_its_half_intensity_ellipse(size, angle, proportion):
    dx, dy = _offsets()
    mask = _shape_mask(NUCLEUS, dx, dy, size, angle, "blobs", proportion)
    opacity = _blob_opacity(dx, dy, size / 2, angle, proportion, 2.0)
    assert ((opacity >= 0.5) == mask).all()
    area = np.pi * (size / 2) ** 2 * (0.5 + 0.5 * proportion)  # minor axis 0.5..1 of the major
    assert abs(mask.sum() - area) <= 0.1 * area
    # faded out 8.5+ px away (the distance is approximate off the curve), partly opaque just outside
    assert opacity[~_dilate(mask, 12)].max() < 0.05 and 0.1 < opacity[_dilate(mask) & ~mask].mean() < 0.5
    upright = _shape_mask(NUCLEUS, dx, dy, size, 0.0, "blobs", proportion)
    ys, xs = np.nonzero(upright)  # the major axis lies along x before rotation
    assert abs((xs.max() - xs.min() + 1) - size) <= 1
    assert abs((ys.max() - ys.min() + 1) - size * (0.5 + 0.5 * proportion)) <= 1


def test_blobs_style_deterministic_for_a_seed(blobs_dir, tmp_path):
    make_shapes(tmp_path / "same", num_train=1, num_val=0, seed=5, style="blobs")
    make_shapes(tmp_path / "other", num_train=1, num_val=0, seed=6, style="blobs")
    first = json.loads((blobs_dir / "train.json").read_text())
    again = json.loads((tmp_path / "same" / "train.json").read_text())
    assert again["annotations"] == [a for a in first["annotations"] if a["image_id"] == 1]
    assert (tmp_path / "same" / "train" / "000001.png").read_bytes() == (blobs_dir / "train" / "000001.png").read_bytes()
    assert json.loads((tmp_path / "other" / "train.json").read_text())["annotations"] != again["annotations"]


def test_blobs_cli_writes_a_dataset_that_checks_and_loads(tmp_path, capsys):
    out = tmp_path / "blobs"
    assert main(["make-shapes", "--out", str(out), "--train", "1", "--val", "1", "--style", "blobs",
                 "--max-shapes", "3"]) == 0
    printed = capsys.readouterr().out
    assert "--config blobs " in printed and "model.num_classes" not in printed  # the preset names its class
    data = json.loads((out / "train.json").read_text())
    assert data["images"][0]["width"] == 512 == data["images"][0]["height"]  # the style's default side
    assert len(data["annotations"]) == 3  # --max-shapes under the style's minimum of 20 is taken as it is
    assert main(["check-dataset", f"{out / 'val.json'}:{out / 'val'}"]) == 0
    ds = CocoDataset(out / "train.json", out / "train")
    image, target = ds[0]
    assert ds.class_names == ["nucleus"] and image.shape[1:] == (512, 512) and len(target["masks"]) == 3


def test_blobs_preset_builds_a_one_class_model():
    cfg = load_config("blobs")
    assert cfg.input.min_size_train == [512] and cfg.input.max_size_test == 512
    model = build_model(cfg)
    assert model.class_names == ["nucleus"] and model.roi_heads.box_predictor.class_logits.out_features == 2
    smallest = model.anchors.cell_anchors[0]  # P2's anchors, one per aspect ratio
    assert float((smallest[:, 2] - smallest[:, 0]).max()) <= 12  # no wider than 8 px at ratio 1 ... 11 px at 2:1
