"""`maskrcnn demo` end to end, tiny: it scores the model on the held-out test split, not on validation."""

from __future__ import annotations

import json
import logging

import numpy as np
from PIL import Image

from maskrcnn.cli import main


def test_demo_scores_on_the_test_split(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--minutes", "0.02", "--train-images", "6", "--val-images", "2",
                   "--test-images", "3", "--overlays", "2", "solver.ims_per_batch=2"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "on 3 held-out test shapes" in printed
    assert "of solver.max_minutes=0.02 spent" in caplog.text  # how the time budget was spent
    data = out / "data"
    test = json.loads((data / "test.json").read_text())
    val = json.loads((data / "val.json").read_text())
    assert len(test["images"]) == 3 and len(val["images"]) == 2
    # The test split is its own random stream: not the validation images again.
    first_test = np.asarray(Image.open(data / "test" / test["images"][0]["file_name"]))
    first_val = np.asarray(Image.open(data / "val" / val["images"][0]["file_name"]))
    assert first_test.shape != first_val.shape or not np.array_equal(first_test, first_val)
    run = next(out.glob("train-*"))
    config = (run / "config.yaml").read_text()
    assert str(data / "test.json") in config and str(data / "val.json") not in config
    metrics = json.loads((run / "eval" / "final" / "metrics.json").read_text())
    assert {"bbox", "segm"} <= set(metrics)
    assert len(list((run / "overlays").glob("*.png"))) == 2
