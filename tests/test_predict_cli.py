"""`maskrcnn predict` end to end: overlays, COCO results, odd image formats, a corrupt file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.data.image_io import read_image


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
    for name in ("colour.jpg", "gray.png", "rgba.png", "deep.tif"):
        assert sum(Path(r["file_name"]).name == name for r in results) > 0, f"no detections on {name}"
        # The overlay is the image as read plus what was drawn on it: some pixels changed, most did not.
        changed = np.any(np.asarray(Image.open(out / f"{Path(name).stem}.png")) != read_image(images / name), axis=-1)
        assert 0 < changed.mean() < 0.9, (name, changed.mean())
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
    def detections(*overrides: str) -> list[dict]:
        out = tmp_path / f"out{len(overrides)}"
        assert main(["predict", str(images / "colour.jpg"), *overrides, "--weights", str(checkpoint),
                     "--out", str(out), "--score-threshold", "0"]) == 0
        return json.loads((out / "predictions.json").read_text())

    assert len(detections()) == 10  # the checkpoint's detections_per_image, every score passes 0
    assert len(detections("model.box_head.detections_per_image=1")) == 1


# ---- streaming to predictions.jsonl, and --resume -------------------------------------------------


def _interrupt_after(monkeypatch, drawn: int) -> None:
    """Make the `drawn + 1`-th overlay drawing raise KeyboardInterrupt, as Ctrl-C in the middle of an image."""
    import maskrcnn.visualize

    real = maskrcnn.visualize.draw_instances
    calls = []

    def draw(*args, **kwargs):
        calls.append(1)
        if len(calls) > drawn:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(maskrcnn.visualize, "draw_instances", draw)


def test_predict_interrupted_then_resumed_equals_one_run(checkpoint, images, tmp_path, capsys, monkeypatch):
    argv = ["predict", str(images), "--weights", str(checkpoint), "--score-threshold", "0.2"]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 1  # broken.png: reported, the others predicted
    lines = (whole / "predictions.jsonl").read_text().splitlines()
    assert [Path(json.loads(line)["file_name"]).name for line in lines] == ["colour.jpg", "deep.tif", "gray.png",
                                                                            "rgba.png"]
    capsys.readouterr()

    # colour.jpg cannot be read this time (say, still being copied), then Ctrl-C while rgba.png is in
    # flight: the two finished images (deep.tif, gray.png) are on disk.
    import maskrcnn.data.image_io
    from maskrcnn.errors import ImageReadError

    real_read = maskrcnn.data.image_io.read_image

    def read_image_but_colour(path, **kwargs):
        if Path(path).name == "colour.jpg":
            raise ImageReadError(f"image '{path}' is being copied")
        return real_read(path, **kwargs)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(maskrcnn.data.image_io, "read_image", read_image_but_colour)
        _interrupt_after(m, drawn=2)
        assert main([*argv, "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err
    log = out / "predictions.jsonl"
    assert len(log.read_text().splitlines()) == 2 and not (out / "predictions.json").exists()
    # A crash in the middle of writing the second line (gray.png): it is cut short.
    log.write_bytes(log.read_bytes()[:-25])

    assert main([*argv, "--out", str(out), "--resume"]) == 1  # broken.png is tried (and reported) again
    err = capsys.readouterr().err
    assert "incomplete last line" in err and "resuming: 1 of 5" in err and "broken.png" in err
    # The log lists images in the order they finished (deep.tif first); predictions.json in input order.
    assert Path(json.loads(log.read_text().splitlines()[0])["file_name"]).name == "deep.tif"
    # Byte-equal to the uninterrupted run: detections, their order, image ids; the overlays too.
    assert (out / "predictions.json").read_bytes() == (whole / "predictions.json").read_bytes()
    assert sorted(log.read_text().splitlines()) == sorted(lines)
    for name in ("colour", "deep", "gray", "rgba"):
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), np.asarray(Image.open(whole / f"{name}.png")))
    assert not list(out.glob(".*tmp*"))


def test_predict_resume_refuses_a_log_that_does_not_match(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--weights", str(checkpoint), "--out", str(out)]
    assert main([*argv, str(images)]) == 1
    capsys.readouterr()
    # Other inputs: colour.jpg was image 2 of the folder, but is image 1 alone.
    assert main([*argv, str(images / "colour.jpg"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "colour.jpg" in err and "--resume" in err and "\n" not in err
    # A damaged line before the last one is not a cut-short write: named, not skipped.
    log = out / "predictions.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0][:-5], *lines[1:]]) + "\n")
    assert main([*argv, str(images), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "line 1" in err and str(log) in err and "\n" not in err
    # Without --resume the log starts over.
    assert main([*argv, str(images)]) == 1
    assert len(log.read_text().splitlines()) == 4
