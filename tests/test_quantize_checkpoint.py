"""`maskrcnn quantize --weights CHECKPOINT`: the checkpoint is exported once into the cache, then quantized."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from support import run_cli, saved_checkpoint, tiny_model

pytest.importorskip("openvino", reason="quantize needs openvino (the deploy extra), not installed")
pytest.importorskip("nncf", reason="quantize needs nncf (the deploy extra), not installed")

from maskrcnn.cli import main  # noqa: E402
from maskrcnn.onnx_model import OnnxMaskRCNN  # noqa: E402


def test_quantize_a_checkpoint_through_the_cached_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MASKRCNN_CACHE", str(tmp_path / "cache"))
    ckpt = saved_checkpoint(tiny_model(), tmp_path / "model.pth")
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((180, 240, 3)) * 255).astype(np.uint8)).save(calibration / f"im{i}.png")
    command = ["quantize", "--weights", str(ckpt), "--calibration", str(calibration)]
    first = run_cli(*command, "--out", str(tmp_path / "a.xml"))  # out of process: see support.run_cli
    assert first.returncode == 0 and "exported '" in first.stderr, first.stderr[-2000:]
    [export] = (tmp_path / "cache" / "exports").glob("*.onnx")
    second = run_cli(*command, "--out", str(tmp_path / "b.xml"))  # a second time: the same export
    assert second.returncode == 0 and f"cached in {export}" in second.stderr, second.stderr[-2000:]
    model = OnnxMaskRCNN(tmp_path / "b.xml", backend="openvino")
    assert model.runner.precision == "int8" and model.cfg.model.num_classes == tiny_model().cfg.model.num_classes
    for args, message in [([], "needs --onnx MODEL.onnx or --weights CHECKPOINT"),
                          (["--onnx", str(export), "--weights", str(ckpt)], "not both")]:
        assert main(["quantize", "--calibration", str(calibration), "--out", str(tmp_path / "c.xml"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
