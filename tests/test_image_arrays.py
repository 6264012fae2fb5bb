"""Images handed to the model in memory (arrays, PIL images, tensors): shapes checked like files are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import load_config
from maskrcnn.errors import ImageReadError
from maskrcnn.modeling import build_model
from maskrcnn.modeling.mask_rcnn import as_image_tensor, drop_empty_instances

TINY = [
    "model.num_classes=3", "model.class_names=[a,b,c]", "model.backbone.depth=18",
    "model.backbone.fpn_channels=16", "model.box_head.fc_dim=32", "model.mask_head.conv_dim=8",
    "model.mask_head.num_convs=1", "model.rpn.post_nms_top_n_test=20", "input.min_size_test=64",
    "input.max_size_test=96",
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(None, TINY)).eval()


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0, 3), (0, 0), (1, 1, 3), (1, 40, 3), (40, 1), (30, 1, 1)])
def test_arrays_smaller_than_2x2_are_refused(shape):
    with pytest.raises(ImageReadError) as e:
        as_image_tensor(np.zeros(shape, dtype=np.uint8))
    message = str(e.value)
    assert "\n" not in message and str(shape) in message and "at least 2" in message


@pytest.mark.parametrize("shape", [(8, 8, 2), (8, 8, 5), (8,), (2, 8, 8, 3)])
def test_arrays_of_other_layouts_are_refused(shape):
    with pytest.raises(ImageReadError, match="HxWx3"):
        as_image_tensor(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("shape", [(3, 0, 5), (3, 1, 8), (8, 8, 3), (3, 8)])
def test_tensors_of_bad_shapes_are_refused(shape):
    with pytest.raises(ImageReadError, match=r"\[3, H, W\]") as e:
        as_image_tensor(torch.zeros(shape))
    assert str(tuple(shape)) in str(e.value)


def test_small_pil_images_are_refused():
    for size in [(1, 1), (0, 5), (7, 1)]:
        with pytest.raises(ImageReadError, match="at least 2"):
            as_image_tensor(Image.new("RGB", size))


def test_accepted_arrays_give_3_channel_tensors():
    pixels = np.arange(2 * 3, dtype=np.uint8).reshape(2, 3) * 40
    for array in (pixels, pixels[..., None], np.repeat(pixels[..., None], 3, axis=2)):
        out = as_image_tensor(array)
        assert out.shape == (3, 2, 3) and out.dtype == torch.float32
        assert torch.equal(out[0], torch.from_numpy(pixels).float() / 255) and torch.equal(out[0], out[2])
    assert as_image_tensor(np.zeros((4, 5, 4), dtype=np.uint8)).shape == (3, 4, 5)  # RGBA: alpha dropped
    assert as_image_tensor(Image.new("L", (5, 4))).shape == (3, 4, 5)


def test_predict_refuses_a_zero_pixel_array_with_one_line(model):
    with pytest.raises(ImageReadError) as e:
        model.predict(np.zeros((0, 5, 3), dtype=np.uint8))
    assert "(0, 5, 3)" in str(e.value) and "\n" not in str(e.value)
    out = model.predict(np.zeros((2, 2, 3), dtype=np.uint8))[0]  # the smallest image still runs
    assert out["masks"].shape[1:] == (2, 2)


def test_predict_reads_files_under_the_models_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    small = build_model(load_config(None, [*TINY, "input.max_pixels=1000"])).eval()
    with pytest.raises(ImageReadError, match="above the limit of 1000"):
        small.predict(str(path))
    with pytest.raises(ImageReadError, match="above the limit of 1000"):
        as_image_tensor(path, max_pixels=1000)
    assert as_image_tensor(path).shape == (3, 30, 40)


def test_zero_width_or_height_instances_are_dropped_from_targets():
    target = {
        "boxes": torch.tensor([[1.0, 1, 5, 5], [3, 3, 3, 9], [2, 4, 8, 4], [0, 0, 2, 2]]),
        "labels": torch.tensor([1, 2, 3, 1]),
        "masks": torch.arange(4, dtype=torch.uint8)[:, None, None].expand(4, 10, 10).clone(),
        "iscrowd": torch.tensor([0, 0, 1, 1]),
        "image_id": 7,
        "file_name": "x.png",
    }
    out = drop_empty_instances(target)
    assert out["boxes"].tolist() == [[1, 1, 5, 5], [0, 0, 2, 2]]
    assert out["labels"].tolist() == [1, 1] and out["iscrowd"].tolist() == [0, 1]
    assert out["masks"][:, 0, 0].tolist() == [0, 3]
    assert out["image_id"] == 7 and out["file_name"] == "x.png"
    assert target["boxes"].shape == (4, 4)  # the caller's target is left as it was
    assert drop_empty_instances(out) is out


def test_training_drops_zero_area_boxes_before_the_heads(model):
    # What the RPN and RoI heads see after preprocessing: no zero-area boxes, the rest resized.
    model.train()
    try:
        target = {"boxes": torch.tensor([[10.0, 10, 10, 30], [4, 4, 20, 16]]), "labels": torch.tensor([1, 2]),
                  "masks": torch.ones(2, 32, 48, dtype=torch.uint8), "iscrowd": torch.tensor([0, 0])}
        _, sizes, targets = model.preprocess([torch.rand(3, 32, 48)], [target])
    finally:
        model.eval()
    assert targets[0]["labels"].tolist() == [2] and targets[0]["masks"].shape == (1, *sizes[0])
    assert targets[0]["boxes"].shape == (1, 4)
