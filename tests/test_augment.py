"""Training augmentation: geometric consistency of every transform, the crop's visibility rule,
determinism under the loader's seeds, and defaults that leave today's samples untouched."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from maskrcnn.config import ConfigError, Config, list_presets, load_config
from maskrcnn.data.augment import Augmenter, CropSpec
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import build_train_loader
from maskrcnn.data.transforms import color_jitter, crop, hflip, mask_boxes, rot90, vflip
from maskrcnn.modeling.mask_rcnn import MaskRCNN

H, W, K = 40, 56, 3  # a landscape image: quarter turns must swap the sides correctly


def _scene() -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Return (image, target, keypoint colours [N,K,3]): two objects with tight boxes, keypoints on
    pixels of a colour found nowhere else in the image."""
    image = torch.full((3, H, W), 0.5)
    masks = torch.zeros((2, H, W), dtype=torch.uint8)
    masks[0, 5:17, 3:20] = 1
    masks[0, 12:20, 15:24] = 1  # an L shape: its box is not its mask
    masks[1, 22:37, 30:51] = 1
    image[:, masks[0].bool()] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    image[:, masks[1].bool()] = torch.tensor([0.1, 0.9, 0.1])[:, None]
    pixels = [[(4, 6), (18, 15), (22, 18)], [(31, 23), (49, 35), (40, 30)]]  # (column, row) inside each mask
    colours = torch.zeros((2, K, 3))
    keypoints = torch.zeros((2, K, 3))
    for n, points in enumerate(pixels):
        for k, (col, row) in enumerate(points):
            colour = torch.tensor([0.02 * (n * K + k + 1), 0.3, 0.7])
            image[:, row, col] = colour
            colours[n, k] = colour
            keypoints[n, k] = torch.tensor([col + 0.5, row + 0.5, 2.0])  # the pixel's centre, as the dataset
    target = {"boxes": mask_boxes(masks), "labels": torch.tensor([1, 2]), "masks": masks,
              "iscrowd": torch.zeros(2, dtype=torch.int64), "keypoints": keypoints}
    return image, target, colours


def _assert_consistent(image: torch.Tensor, target: dict, colours: torch.Tensor) -> None:
    """Boxes are the tight boxes of their masks, masks cover their object's colour, and each labelled
    keypoint sits on the pixel of its own colour."""
    assert torch.equal(target["boxes"], mask_boxes(target["masks"]))
    h, w = image.shape[-2:]
    assert target["masks"].shape[-2:] == (h, w)
    for n, kps in enumerate(target["keypoints"]):
        for k, (x, y, v) in enumerate(kps.tolist()):
            if v > 0:
                assert torch.allclose(image[:, int(y), int(x)], colours[n, k]), (n, k)
                assert target["masks"][n][int(y), int(x)] == 1


@pytest.mark.parametrize("name, transform", [
    ("hflip", lambda im, t: hflip(im, t)),
    ("vflip", lambda im, t: vflip(im, t)),
    ("rot90", lambda im, t: rot90(im, t, 1)),
    ("rot180", lambda im, t: rot90(im, t, 2)),
    ("rot270", lambda im, t: rot90(im, t, 3)),
    ("crop", lambda im, t: crop(im, t, 8, 10, 25, 36)),
])
def test_geometry_stays_consistent(name, transform):
    image, target, colours = _scene()
    out_image, out = transform(image, target)
    _assert_consistent(out_image, out, colours)
    if name.startswith("rot") and name != "rot180":
        assert out_image.shape[-2:] == (W, H)
    assert torch.equal(target["masks"], _scene()[1]["masks"])  # the input target is left alone


def test_flips_trade_left_and_right_keypoints():
    image, target, colours = _scene()
    swap = [2, 1, 0]  # keypoints 0 and 2 are mirror partners
    for flip in (hflip, vflip):
        out_image, out = flip(image, target, swap)
        _assert_consistent(out_image, out, colours[:, swap])


def test_full_pipeline_stays_consistent():
    image, target, colours = _scene()
    augment = Augmenter(horizontal_flip=0.5, vertical_flip=0.5, rotate90=0.5,
                        crop=CropSpec("relative_range", [0.5, 1.0]))
    for seed in range(12):
        torch.manual_seed(seed)
        _assert_consistent(*augment(image, target), colours)


def test_crop_visibility_rule():
    image, target, _ = _scene()
    # Rows 12..31, columns 0..39: object 0 keeps 132 of its 251 pixels (53%), object 1 100 of 315 (32%).
    window = (12, 0, 20, 40)
    _, out = crop(image, target, *window, min_visible_fraction=0.3)
    assert out["iscrowd"].tolist() == [0, 0] and out["labels"].tolist() == [1, 2]
    _, out = crop(image, target, *window, min_visible_fraction=0.5)
    assert out["iscrowd"].tolist() == [0, 1]  # cut: ignored, not taught as background
    _, out = crop(image, target, *window, min_visible_fraction=0.6)
    assert out["iscrowd"].tolist() == [1, 1]
    _, out = crop(image, target, *window, min_visible_area_px=100)
    assert out["iscrowd"].tolist() == [0, 0]
    _, out = crop(image, target, *window, min_visible_area_px=101)
    assert out["iscrowd"].tolist() == [0, 1]
    # keypoints outside the window become unlabelled: (4, 6) of object 0, (49, 35) and (40, 30) of object 1
    assert (out["keypoints"][..., 2] > 0).tolist() == [[False, True, True], [True, False, False]]
    assert out["keypoints"][0, 0].tolist() == [0, 0, 0]
    _, out = crop(image, target, 0, 0, 21, 28)  # object 1 entirely outside: removed
    assert out["labels"].tolist() == [1] and out["masks"].shape == (1, 21, 28)
    assert out["boxes"].tolist() == [[3.0, 5.0, 24.0, 20.0]] and out["keypoints"].shape == (1, K, 3)


def test_random_crop_keeps_an_object_when_it_can():
    image, target, _ = _scene()
    spec = CropSpec("absolute", [12, 12], min_visible_fraction=0.3)
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out = Augmenter(crop=spec)(image, target)
        assert out_image.shape[-2:] == (12, 12) or torch.equal(out_image, image)  # else left uncropped
        assert (out["iscrowd"] == 0).any()


def test_color_jitter():
    image, _, _ = _scene()
    assert torch.equal(color_jitter(image), image)
    assert torch.allclose(color_jitter(image, brightness=0.5), image * 0.5)
    grey = color_jitter(image, saturation=0.0)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    flat = color_jitter(image, contrast=0.0)
    assert torch.allclose(flat, flat[:, :1, :1].expand_as(flat))


def test_same_seed_same_sample_different_seed_different():
    image, target, _ = _scene()
    augment = Augmenter(horizontal_flip=0.5, vertical_flip=0.5, rotate90=0.5,
                        crop=CropSpec("relative_range", [0.3, 1.0]), brightness=0.4, contrast=0.4, saturation=0.4)

    def sample(seed: int):
        torch.manual_seed(seed)
        return augment(image, target)

    a, b = sample(3), sample(3)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in ("boxes", "keypoints"))
    assert torch.equal(a[1]["masks"].to_dense(), b[1]["masks"].to_dense())
    assert not torch.equal(a[0], sample(4)[0]) or not torch.equal(a[1]["boxes"], sample(4)[1]["boxes"])


AUGMENTED = ["input.crop.enabled=true", "input.crop.type=relative_range", "input.crop.size=[0.5,1.0]",
             "input.vertical_flip=0.5", "input.rotate90=0.5", "input.color_jitter.brightness=0.3"]


def _stream(shapes, overrides: list[str], seed: int, start: int = 0, n: int = 3):
    """Return n train batches (images and boxes) from the trainer's own dataset and loader."""
    from maskrcnn.engine.train_setup import build_train_dataset

    ann, images = shapes["train"]
    cfg = load_config(None, [f"data.train=['{ann}:{images}']", *overrides])
    stream = build_train_loader(build_train_dataset(cfg), batch_size=2, seed=seed, start_iter=start)
    return [(imgs, [t["boxes"] for t in targets]) for imgs, targets in itertools.islice(stream, n)]


def _same(a, b) -> bool:
    return all(len(x[0]) == len(y[0]) and all(torch.equal(p, q) for p, q in zip(x[0] + x[1], y[0] + y[1]))
               for x, y in zip(a, b))


def test_loader_is_deterministic_and_resumable_with_augmentation(shapes):
    full = _stream(shapes, AUGMENTED, seed=7, n=4)
    assert _same(full, _stream(shapes, AUGMENTED, seed=7, n=4))
    assert not _same(full, _stream(shapes, AUGMENTED, seed=8, n=4))
    assert _same(full[2:], _stream(shapes, AUGMENTED, seed=7, start=2, n=2))


def test_defaults_change_nothing(shapes):
    """With the new keys at their defaults, a sample is what the flip-only dataset gave, draw for draw."""
    for preset in list_presets():
        augment = Augmenter.from_config(load_config(preset).input)
        assert (augment.crop, augment.vertical_flip, augment.rotate90) == (None, 0.0, 0.0), preset
        assert (augment.brightness, augment.contrast, augment.saturation) == (0.0, 0.0, 0.0), preset
    ann, images = shapes["train"]
    plain = CocoDataset(ann, images)
    trained = CocoDataset(ann, images, train=True, augment=Augmenter.from_config(Config().input))
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = trained[seed % len(trained)]
        after = torch.rand(())
        # Today's rule, written out: one draw, a flip below 0.5.
        torch.manual_seed(seed)
        expected_image, expected = plain[seed % len(plain)]
        if torch.rand(()).item() < 0.5:
            expected_image, expected = hflip(expected_image, expected)
        assert torch.equal(image, expected_image) and torch.equal(target["boxes"], expected["boxes"])
        assert torch.equal(target["masks"].to_dense(), expected["masks"].to_dense())
        assert torch.equal(torch.rand(()), after)  # and no extra random draw


def test_scale_jitter_range():
    cfg = load_config(None, ["input.min_size_train_sampling=range", "input.min_size_train=[96,100]"])
    model = SimpleNamespace(cfg=cfg, training=True)
    torch.manual_seed(0)
    sizes = {MaskRCNN._target_size(model, 100, 100)[0] for _ in range(200)}
    assert sizes == {96, 97, 98, 99, 100}
    choice = SimpleNamespace(cfg=load_config(None, ["input.min_size_train=[96,100]"]), training=True)
    assert {MaskRCNN._target_size(choice, 100, 100)[0] for _ in range(50)} == {96, 100}


@pytest.mark.parametrize("override, message", [
    ("input.min_size_train_sampling=range", "needs \\[lo, hi\\]"),
    ("input.vertical_flip=1.5", "probability in 0..1"),
    ("input.rotate90=-0.1", "probability in 0..1"),
    ("input.color_jitter.contrast=2", "must be in 0..1"),
    ("input.crop.size=[0.5,1.2]", "fractions \\[lo, hi\\]"),
    ("input.crop.size=[100.5,200]", "whole pixel sizes"),
    ("input.crop.size=[100]", "needs 2 values"),
    ("input.crop.min_visible_fraction=1.5", "must be in 0..1"),
    ("input.crop.type=relative", "is not one of"),
])
def test_bad_values_are_one_line_errors(override, message):
    extra = ["input.min_size_train=[100,200,300]"] if "sampling" in override else []
    crop_on = ["input.crop.enabled=true"] + (["input.crop.type=relative_range"] if "1.2" in override else [])
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, extra + crop_on + [override])
    assert "\n" not in str(e.value)


def test_show_data_draws_a_grid(shapes, tmp_path):
    from PIL import Image

    from maskrcnn.cli import main

    ann, images = shapes["train"]
    out = tmp_path / "grid.png"
    status = main(["show-data", "--data", f"{ann}:{images}", "--out", str(out), "--n", "3", "--cell", "64",
                   "solver.ims_per_batch=2", *AUGMENTED])
    assert status == 0
    grid = Image.open(out)
    assert grid.size == (2 * 68 + 4, 2 * 68 + 4)  # 3 samples: 2 x 2 cells of 64 px with 4-px gaps
    assert main(["show-data", "--data", f"{ann}:{images}", "--out", str(out), "--n", "0"]) == 2
