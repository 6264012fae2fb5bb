"""`maskrcnn predict` end to end: overlays, COCO results, odd image formats, a corrupt file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli import main


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / "colour.jpg")
    Image.fromarray(rng.integers(0, 255, (80, 60), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (70, 50), dtype=np.uint16)).save(folder / "deep.tif")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_predict_folder_writes_overlays_and_coco_results(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["predict", str(images), "--weights", str(checkpoint), "--out", str(out),
                   "--score-threshold", "0.2"])
    assert status == 1  # one file failed, the others were still predicted
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    for name in ("colour", "gray", "rgba", "deep"):
        overlay = Image.open(out / f"{name}.png")
        assert overlay.mode == "RGB"
    assert Image.open(out / "gray.png").size == (60, 80)  # overlays keep the input size
    results = json.loads((out / "predictions.json").read_text())
    assert results, "expected detections from the confident classifier"
    for r in results:
        assert r["category_id"] in (1, 2, 3) and len(r["bbox"]) == 4 and r["score"] >= 0.2
        assert set(r["segmentation"]) == {"size", "counts"}
        assert "broken" not in r["file_name"]
    assert not list(out.glob(".*tmp*")), "no temporary files left behind"


def test_predict_all_good_exits_zero_and_accepts_globs(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(images / "*.png"), "--weights", str(checkpoint), "--out", str(out)]) == 1
    (images / "broken.png").unlink()
    assert main(["predict", str(images / "*.png"), "--weights", str(checkpoint), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["gray.png", "rgba.png"]


def test_predict_missing_inputs_is_one_line_error(checkpoint, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing*.png"), "--weights", str(checkpoint)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no file matches")


def test_predict_with_override_after_inputs(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    (images / "broken.png").unlink()
    status = main(["predict", str(images / "colour.jpg"), "model.box_head.detections_per_image=1",
                   "--weights", str(checkpoint), "--out", str(out), "--score-threshold", "0"])
    assert status == 0
    assert len(json.loads((out / "predictions.json").read_text())) <= 1
