"""read_image: every mode becomes HxWx3 uint8 RGB; every bad file becomes one clear ImageReadError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.image_io import image_to_tensor, read_image
from maskrcnn.errors import ImageReadError, UserError


def _save(path: Path, im: Image.Image, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_png_roundtrip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = read_image(_save(tmp_path / "a.png", Image.fromarray(a)))
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("ext", ["jpg", "bmp", "tiff"])
def test_other_formats(tmp_path, ext):
    im = Image.new("RGB", (10, 6), (200, 100, 50))
    out = read_image(_save(tmp_path / f"a.{ext}", im))
    assert out.shape == (6, 10, 3)
    assert np.abs(out.astype(int) - [200, 100, 50]).max() <= 3


def test_grayscale(tmp_path):
    out = read_image(_save(tmp_path / "g.png", Image.new("L", (5, 4), 77)))
    assert out.shape == (4, 5, 3) and (out == 77).all()


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red
    a[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    out = read_image(_save(tmp_path / "a.png", Image.fromarray(a, "RGBA")))
    assert out.shape == (4, 4, 3)
    assert (out[:2] == [255, 0, 0]).all() and (out[2:] == 255).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    im.info["transparency"] = 1
    out = read_image(_save(tmp_path / "p.png", im, transparency=1))
    assert out.shape == (4, 4, 3) and (out == [0, 0, 255]).all()


def test_16bit_png_scaled(tmp_path):
    a = np.full((3, 6), 65535, np.uint16)
    a[0] = 0
    a[1] = 32896  # 128 * 257
    out = read_image(_save(tmp_path / "d.png", Image.fromarray(a)))
    assert out.shape == (3, 6, 3) and out.dtype == np.uint8
    assert (out[0] == 0).all() and (out[1] == 128).all() and (out[2] == 255).all()


def test_exif_rotation_transposes(tmp_path):
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = read_image(_save(tmp_path / "r.jpg", im, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist") as e:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(e.value) and "\n" not in str(e.value)


def test_directory(tmp_path):
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, I am text")
    with pytest.raises(ImageReadError, match="not an image") as e:
        read_image(p)
    assert "notes.jpg" in str(e.value)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated(tmp_path, ext):
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    p = _save(tmp_path / f"t.{ext}", Image.fromarray(a))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt") as e:
        read_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("size", [(1, 10), (10, 1), (1, 1)])
def test_one_pixel_images_refused(tmp_path, size):
    with pytest.raises(ImageReadError, match="at least 2x2"):
        read_image(_save(tmp_path / "s.png", Image.new("RGB", size)))


def test_too_large_refused_before_decoding(tmp_path):
    p = _save(tmp_path / "big.png", Image.new("RGB", (100, 50)))
    with pytest.raises(ImageReadError, match="above the limit of 4000"):
        read_image(p, max_pixels=4000)
    assert read_image(p, max_pixels=5000).shape == (50, 100, 3)


def test_image_read_error_is_user_error():
    assert issubclass(ImageReadError, UserError)


def test_image_to_tensor():
    a = np.zeros((2, 3, 3), np.uint8)
    a[..., 1] = 255
    t = image_to_tensor(a)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32 and t.is_contiguous()
    assert t[1].eq(1).all() and t[0].eq(0).all()
