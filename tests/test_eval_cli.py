"""`maskrcnn eval` from the command line: scoring results files, and clear one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from support import drawn_in
from maskrcnn.cli import main
from maskrcnn.commands.eval import label_to_category
from maskrcnn.config import Config
from maskrcnn.errors import UserError


def _rle(x0: int, y0: int, x1: int, y1: int, h: int = 64, w: int = 80) -> dict:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_set(tmp_path: Path) -> tuple[Path, Path]:
    """A two-image ground truth and the perfect results file for it."""
    boxes = {1: [(5, 5, 30, 40, 1), (40, 10, 75, 60, 2)], 2: [(10, 20, 50, 50, 2)]}
    anns, results = [], []
    for image_id, objs in boxes.items():
        for x0, y0, x1, y1, cat in objs:
            rle = _rle(x0, y0, x1, y1)
            bbox = [x0, y0, x1 - x0, y1 - y0]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": rle,
                         "area": float(mask_util.area(rle)), "bbox": bbox, "iscrowd": 0})
            results.append({"image_id": image_id, "category_id": cat, "bbox": bbox, "score": 0.99,
                            "segmentation": rle})
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 80} for i in boxes],
          "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}],
          "annotations": anns}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "perfect.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "perfect.json"


def test_eval_predictions_perfect_gives_100(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt, perfect = write_set(tmp_path)
    out = tmp_path / "eval"
    code = main(["eval", "--predictions", str(perfect), "--data", f"{gt}:{tmp_path / 'images'}", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["bbox"]["APl"] is None  # no large objects: not measurable, written as null
    # Precision 1 at every recall: a flat line along the top of both plots (the last curve drawn, C2,
    # covers the other two), nothing lower down.
    plot = out / "pr_curve.png"
    assert drawn_in(plot, "C2", rows=(0.0, 0.2)).any(axis=0).mean() > 0.7
    assert not any(drawn_in(plot, colour, rows=(0.25, 0.65)).any() for colour in ("C0", "C1", "C2"))
    printed = capsys.readouterr().out
    assert "AP50" in printed and "square" in printed and str(out / "metrics.json") in printed
    assert "Accumulating" not in printed  # pycocotools' own chatter stays out of the table


@pytest.mark.parametrize("argv, message", [
    (["--predictions", "{tmp}/missing.json", "--data", "{tmp}/gt.json:{tmp}"], "does not exist"),
    (["--predictions", "{tmp}/perfect.json", "--data", "{tmp}/nope.json:{tmp}"], "does not exist"),
    (["--predictions", "{tmp}/perfect.json"], "no evaluation data"),
    (["--data", "{tmp}/gt.json:{tmp}"], "--weights"),
    (["--weights", "{tmp}/w.pth", "--predictions", "{tmp}/perfect.json", "--data", "{tmp}/gt.json:{tmp}"],
     "not both"),
    (["--predictions", "{tmp}/perfect.json", "--data", "{tmp}/gt.json:{tmp}", "--resume"], "--resume"),
])
def test_eval_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                           message: str) -> None:
    write_set(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["eval", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


class _Data:
    ann_file = "gt.json"

    def __init__(self, ids: list[int], names: list[str]) -> None:
        self.category_ids, self.class_names = ids, names


def test_label_to_category() -> None:
    cfg = Config()
    cfg.model.num_classes = 2
    assert label_to_category(cfg, _Data([4, 9], ["a", "b"])) == [4, 9]
    cfg.model.category_ids = [9, 4]  # recorded by the trainer: wins over the dataset's order
    assert label_to_category(cfg, _Data([4, 9], ["a", "b"])) == [9, 4]
    with pytest.raises(UserError, match="category ids"):
        label_to_category(cfg, _Data([4, 5], ["a", "b"]))
    # torchvision style: labels are the category ids themselves, with unused slots.
    cfg = Config()
    cfg.model.num_classes, cfg.model.class_names = 3, ["a", "N/A", "c"]
    assert label_to_category(cfg, _Data([1, 3], ["a", "c"])) == [1, 2, 3]
    with pytest.raises(UserError, match="3 classes"):
        label_to_category(cfg, _Data([1, 2], ["a", "b"]))


def test_eval_runs_a_saved_model_on_a_dataset(checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`maskrcnn eval --weights W --config RUN/config.yaml --data ANN:DIR`, as docs/predict-eval.md shows it."""
    from maskrcnn.api import config_from_checkpoint
    from maskrcnn.data.shapes import make_shapes

    ann, images = make_shapes(tmp_path / "data", num_train=0, num_val=3, seed=0, image_size=64)["val"]
    config = tmp_path / "config.yaml"
    config_from_checkpoint(checkpoint).save(config)
    out = tmp_path / "eval"
    code = main(["eval", "--weights", str(checkpoint), "--config", str(config), "--data", f"{ann}:{images}",
                 "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
    assert 0 <= metrics["segm"]["AP"] <= 100  # an untrained model: the number is real, not good
    results = json.loads((out / "predictions.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 3}
    assert any(p.suffix == ".png" for p in out.iterdir())
    assert "segm" in capsys.readouterr().out
    # Detections were streamed, one line per image; --resume finds all three done and scores them again.
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    predictions = (out / "predictions.json").read_bytes()
    assert main(["eval", "--weights", str(checkpoint), "--config", str(config), "--data", f"{ann}:{images}",
                 "--out", str(out), "--resume"]) == 0
    assert "resuming: 3 of 3" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "predictions.json").read_bytes() == predictions
