"""Read any common image file as HxWx3 uint8 RGB, or fail with one line that names the file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from maskrcnn.errors import ImageReadError

# The image files a folder given to predict or quantize is read for.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

DEFAULT_MAX_PIXELS = 100_000_000

# Modes that carry an alpha channel; they are composited onto white (how viewers show them).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return the image at `path` as an HxWx3 uint8 RGB array, upright per its EXIF orientation."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image '{path}' does not exist; check the path or the dataset's image directory")
    if path.is_dir():
        raise ImageReadError(f"image '{path}' is a directory, not an image file")
    try:
        # PIL's own bomb guard would fire at its global limit; ours (max_pixels) is checked below
        # before any pixel is decoded, so silence the warning and translate the hard error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(path, im.size, max_pixels)
                im.load()  # force a full decode now so truncated files fail here, not later
                im = ImageOps.exif_transpose(im)
                return _to_rgb_array(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"image '{path}' is too large to decode safely; shrink it below {max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(_unidentified_reason(path)) from None
    except PermissionError:
        raise ImageReadError(f"image '{path}' cannot be read: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(
            f"image '{path}' is truncated or corrupt ({reason}); re-export or remove it"
        ) from None


# File signatures of the formats we read, to tell a damaged image from a file that is no image.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF", b"GIF8": "GIF", b"RIFF": "WebP",
}


def _unidentified_reason(path: Path) -> str:
    """Return the one-line message for a file PIL cannot identify: empty, damaged image, or no image."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        return f"image '{path}' cannot be read: {e.strerror}"
    if not head:
        return f"image '{path}' is an empty file (0 bytes); re-export or remove it"
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if min(w, h) < 2:
            return f"image '{path}' is {w}x{h} pixels; images must be at least 2x2"
    for magic, kind in _SIGNATURES.items():
        if head.startswith(magic):
            return f"image '{path}' starts like a {kind} file but cannot be decoded (corrupt); re-export or remove it"
    return f"file '{path}' is not an image PIL can read (expected JPEG, PNG, BMP, TIFF, ...)"


def _check_size(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    """Raise ImageReadError for images too small to hold an object or too large to decode."""
    w, h = size
    if w < 2 or h < 2:
        raise ImageReadError(f"image '{path}' is {w}x{h} pixels; images must be at least 2x2")
    if w * h > max_pixels:
        raise ImageReadError(
            f"image '{path}' is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}; "
            "downscale it or raise input.max_pixels"
        )


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array for an image in any PIL mode."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if im.mode.startswith("I") or im.mode == "F":
        gray = _high_depth_to_uint8(np.asarray(im), im.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit integer or float single-channel array to uint8."""
    a = a.astype(np.float64)
    if mode == "F":
        # Float images are either 0..1 or already 0..255; anything else is stretched to its range.
        peak = float(a.max()) if a.size else 0.0
        scale = 255.0 if peak <= 1.0 else (1.0 if peak <= 255.0 else 255.0 / peak)
    else:
        # 16-bit data (I;16 modes, and "I" holding PNG 16-bit values) maps 0..65535 -> 0..255.
        scale = 255.0 / 65535.0
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """Return an HxWx3 uint8 array as a contiguous float32 tensor [3,H,W] with values in 0..1."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image array, got shape {tuple(image.shape)}")
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    return torch.from_numpy(chw).to(torch.float32).div_(255.0)
