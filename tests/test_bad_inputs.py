"""Bad inputs a user can give: each is one clear line naming the file, key or value, never a traceback.

Images (missing, unreadable, truncated, 0/1 pixel, above `input.max_pixels`, text named .jpg) through
`read_image`, the Python API and `maskrcnn predict` (which reports each bad file, skips it, predicts
the rest and exits 1); annotation files (malformed JSON, COCO keys missing) through `maskrcnn train`
and `maskrcnn eval`; config mistakes (unknown keys, values of the wrong type) through the CLI and
YAML files (exit status 2).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.config import ConfigError, load_config
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.image_io import read_image
from maskrcnn.errors import ImageReadError, UserError

# ---- helpers ------------------------------------------------------------------------------------


def _error_line(capsys: pytest.CaptureFixture) -> str:
    """Return the single stderr line of a failed command, after checking it is one line and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Progress bars (tqdm, e.g. "eval:   0%|") may precede the error; everything else must be that line.
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not re.match(r"\w+: +\d+%\|", line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` (PIL cannot even open one with a 0 side)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _truncated(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# name -> (how to write it, words the message must contain). Sizes: good images are 64x64 = 4096
# pixels; "huge" is 100x100 = 10000, above the limit of 5000 the tests set with input.max_pixels.
MAX_PIXELS = 5000
BAD_IMAGES = {
    "truncated.jpg": (lambda p: p.write_bytes(_truncated(_noise(64, 64), "JPEG")), "truncated or corrupt"),
    "truncated.png": (lambda p: p.write_bytes(_truncated(_noise(64, 64), "PNG")), "truncated or corrupt"),
    "one_pixel.png": (lambda p: Image.new("RGB", (1, 1)).save(p), "1x1 pixels; images must be at least 2x2"),
    "one_row.png": (lambda p: Image.new("RGB", (40, 1)).save(p), "40x1 pixels"),
    "zero_pixels.png": (lambda p: p.write_bytes(_png_header_only(0, 0)), "0x0 pixels"),
    "huge.png": (lambda p: Image.new("RGB", (100, 100)).save(p),
                 f"100x100 = 10000 pixels, above the limit of {MAX_PIXELS}; downscale it or raise input.max_pixels"),
    "text.jpg": (lambda p: p.write_text("name,score\nfoo,1\n"), "is not an image"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "fake_header.png": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "cannot be decoded"),
}


@pytest.fixture()
def bad_folder(tmp_path: Path) -> Path:
    """A folder holding one good image and every kind of bad one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    _noise(64, 64, seed=1).save(folder / "good.png")
    for name, (write, _) in BAD_IMAGES.items():
        write(folder / name)
    return folder


# ---- images: read_image and the Python API ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_read_image_names_the_file_and_the_problem(bad_folder: Path, name: str) -> None:
    path = bad_folder / name
    with pytest.raises(ImageReadError) as e:
        read_image(path, max_pixels=MAX_PIXELS)
    message = str(e.value)
    assert str(path) in message and BAD_IMAGES[name][1] in message and "\n" not in message
    assert isinstance(e.value, UserError)


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"image '.*nowhere\.jpg' does not exist; check the path"):
        read_image(tmp_path / "nowhere.jpg")


def test_unreadable_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the file is denied as for a file of mode 000; made so by patching open(), because root
    (as in CI) reads any file whatever its mode."""
    path = tmp_path / "locked.png"
    _noise(8, 8).save(path)
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(ImageReadError, match=r"locked\.png' cannot be read: permission denied"):
        read_image(path)


def test_model_predict_on_a_bad_path_raises_image_read_error(checkpoint, bad_folder: Path) -> None:
    """The API user gets our exception (a UserError with the same one-line message), not PIL's."""
    from maskrcnn.api import load_model

    model = load_model(None, weights=checkpoint)
    for name in ("truncated.jpg", "text.jpg", "one_pixel.png"):
        with pytest.raises(ImageReadError, match=re.escape(name)):
            model.predict(str(bad_folder / name))
    with pytest.raises(ImageReadError, match="does not exist"):
        model.predict(str(bad_folder / "missing.jpg"))
    assert len(model.predict(str(bad_folder / "good.png"))) == 1


# ---- images: maskrcnn predict over a folder ------------------------------------------------------


def test_predict_reports_each_bad_file_in_one_line_and_predicts_the_rest(
    checkpoint, bad_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    missing = bad_folder.parent / "missing.jpg"
    status = main(["predict", str(bad_folder), str(missing), f"input.max_pixels={MAX_PIXELS}",
                   "--weights", str(checkpoint), "--out", str(out), "--score-threshold", "0.2"])
    assert status == 1  # some images failed; the good one was still predicted
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line.strip("\r ") for line in re.split(r"[\r\n]", err) if "skipped:" in line]
    expected = {**{name: words for name, (_, words) in BAD_IMAGES.items()}, "missing.jpg": "does not exist"}
    assert len(lines) == len(expected), lines
    for name, words in expected.items():
        (line,) = [line for line in lines if f"/{name}'" in line]
        assert line.startswith("skipped: ") and words in line
    summary = [line for line in err.splitlines() if "image(s) failed" in line]
    assert len(summary) == 1 and summary[0].startswith(f"{len(expected)} image(s) failed (each reported above): ")
    assert summary[0].endswith(f" and {len(expected) - 5} more")
    assert (out / "good.png").is_file()
    assert sorted(p.name for p in out.glob("*.png")) == ["good.png"]
    results = json.loads((out / "predictions.json").read_text())
    assert results and {Path(r["file_name"]).name for r in results} == {"good.png"}


def test_predict_single_missing_file(checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(["predict", str(tmp_path / "nope.jpg"), "--weights", str(checkpoint), "--out", str(tmp_path / "o")])
    assert status == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nope.jpg' does not exist" in err


# ---- annotation files: maskrcnn train / maskrcnn eval -------------------------------------------


def _dataset(root: Path, **changes) -> tuple[Path, Path]:
    """Write a valid one-image COCO set, then apply `changes` (a key set to None is deleted)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    _noise(32, 24).save(images / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0,
                         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]}],
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            entry = data[section][0]
            if value is None:
                del entry[field]
            else:
                entry[field] = value
        elif value is None:
            del data[section]
        else:
            data[section] = value
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images


TRAIN = ["train", "--config", "shapes"]

MISSING_KEYS = [
    ({"images": None}, "has no 'images' list; is it a COCO instances file?"),
    ({"categories": None}, "has no 'categories' list"),
    ({"images__width": None}, "images[0] is missing 'width'; every entry needs id, file_name, width, height"),
    ({"images__file_name": None}, "images[0] is missing 'file_name'"),
    ({"annotations__category_id": None}, "annotations[0] is missing 'category_id'"),
    ({"annotations__image_id": None}, "annotations[0] is missing 'image_id'"),
    ({"categories__name": None}, "categories[0] is missing 'name'"),
    ({"annotations": {"not": "a list"}}, "'annotations' must be a list, got dict"),
    ({"images__width": "32"}, "images[0] needs positive integer 'width' and 'height', got '32' and 24"),
    ({"images__id": "1"}, "images[0] has id '1'; image ids must be integers"),
    ({"annotations__iscrowd": "no"}, "annotations[0] has iscrowd 'no'; expected 0 or 1"),
    ({"annotations__image_id": 7}, "annotations[0] refers to image_id 7, which is not in 'images'"),
]


def test_train_with_malformed_annotation_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ann, images = _dataset(tmp_path)
    ann.write_text('{"images": [{"id": 1,}]')
    status = main(TRAIN + ["--out", str(tmp_path / "run"), f"data.train=[{ann}:{images}]", "solver.max_iter=1"])
    assert status == 2
    line = _error_line(capsys)
    assert f"annotation file '{ann}' is not valid JSON (line 1, column 22" in line


@pytest.mark.parametrize("changes, words", MISSING_KEYS)
def test_train_with_coco_json_missing_keys(tmp_path: Path, capsys: pytest.CaptureFixture, changes, words) -> None:
    ann, images = _dataset(tmp_path, **changes)
    status = main(TRAIN + ["--out", str(tmp_path / "run"), f"data.train=[{ann}:{images}]", "solver.max_iter=1"])
    assert status == 2
    line = _error_line(capsys)
    assert str(ann) in line and words in line


@pytest.mark.parametrize("changes, words", [
    ({}, "is not valid JSON"),  # the file is overwritten with broken JSON below
    ({"images__height": None}, "images[0] is missing 'height'"),
    ({"annotations__category_id": 5}, "annotations[0] has category_id 5, which is not in 'categories'"),
])
@pytest.mark.parametrize("mode", ["weights", "predictions"])
def test_eval_with_bad_annotation_file(checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       changes, words, mode) -> None:
    ann, images = _dataset(tmp_path, **changes)
    if not changes:
        ann.write_text('{"images": [')
    results = tmp_path / "results.json"
    results.write_text("[]")
    source = ["--weights", str(checkpoint)] if mode == "weights" else ["--predictions", str(results)]
    status = main(["eval", *source, "--data", f"{ann}:{images}", "--out", str(tmp_path / "eval")])
    assert status == 2
    line = _error_line(capsys)
    assert str(ann) in line and words in line


def test_eval_with_a_truncated_image_names_it(checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shapes = [{"id": i, "name": n} for i, n in enumerate(["square", "circle", "triangle"], start=1)]
    ann, images = _dataset(tmp_path, categories=shapes)  # the tiny model's classes
    (images / "a.png").write_bytes(_truncated(_noise(32, 24), "PNG"))
    status = main(["eval", "--weights", str(checkpoint), "--data", f"{ann}:{images}", "--out", str(tmp_path / "e")])
    assert status == 2
    line = _error_line(capsys)
    assert f"image '{images / 'a.png'}' is truncated or corrupt" in line


def test_dataset_image_above_max_pixels_is_refused_when_loading(tmp_path: Path) -> None:
    ann, images = _dataset(tmp_path)
    with pytest.raises(UserError, match=r"images\[0\] \('a.png'\) is 32x24 = 768 pixels, above the limit of 700"):
        CocoDataset(ann, images, max_pixels=700)


# ---- config: unknown keys and values of the wrong type ------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("solver.base_lrr=0.1", "unknown config key 'solver.base_lrr'; did you mean 'solver.base_lr'?"),
    ("model.backbone.deph=50", "unknown config key 'model.backbone.deph'; did you mean 'model.backbone.depth'?"),
    ("modle.num_classes=3", "unknown config key 'modle.num_classes'; did you mean 'model.num_classes'?"),
    ("solver.base_lr=abc", "config key 'solver.base_lr' expects a number, got 'abc'"),
    ("model.num_classes=[1]", "config key 'model.num_classes' expects an integer, got a list [1]"),
    ("model.num_classes=2.5", "config key 'model.num_classes' expects an integer, got 2.5"),
    ("solver.base_lr={value: 0.1}", "config key 'solver.base_lr' expects a number, got a mapping {'value': 0.1}"),
    ("solver.base_lr=.nan", "config key 'solver.base_lr' expects a finite number, got nan"),
    ("solver.steps=soon", "config key 'solver.steps' expects a list of integers, got 'soon'"),
    ("model.mask_head.enabled=3", "config key 'model.mask_head.enabled' expects true/false, got 3"),
    ("model.backbone=50", "config key 'model.backbone' is a section and expects a mapping of its keys"),
    ("solver.amp=float16", "config key 'solver.amp' = 'float16' is not one of ['', 'bf16', 'fp16', 'auto']"),
])
def test_config_override_errors(override: str, words: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--config", "shapes", override]) == 2
    line = _error_line(capsys)
    assert words in line


def test_number_written_with_an_exponent_is_a_number() -> None:
    """YAML 1.1 reads 1e-4 as text; a config that asks for a number takes it as the number it is."""
    cfg = load_config("shapes", ["solver.base_lr=1e-4", "solver.max_iter=2e3"])
    assert cfg.solver.base_lr == 1e-4 and cfg.solver.max_iter == 2000


@pytest.mark.parametrize("text, words", [
    ("solver:\n  base_lr:\n    value: 0.1\n", "config key 'solver.base_lr' expects a number, got a mapping {'value': 0.1}"),
    ("model:\n  num_classes: [3]\n", "config key 'model.num_classes' expects an integer, got a list [3]"),
    ("solver:\n  max_iter: lots\n", "config key 'solver.max_iter' expects an integer, got 'lots'"),
    ("solver:\n  base_lrr: 0.1\n", "unknown config key 'solver.base_lrr'; did you mean 'solver.base_lr'?"),
    ("model: 3\n", "config key 'model' is a section and expects a mapping of its keys"),
    ("- a\n- b\n", "must hold a mapping of keys, not list"),
    ("solver: {base_lr: 0.1\n", "is not valid YAML"),
])
def test_yaml_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture, text: str, words: str) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: shapes\n" + text if not text.startswith("-") else text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert words in str(e.value) and "\n" not in str(e.value)
    assert main(["train", "--config", str(path)]) == 2
    line = _error_line(capsys)
    assert str(path) in line and words in line
