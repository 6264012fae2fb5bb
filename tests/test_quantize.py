"""`maskrcnn quantize`: the int8 OpenVINO IR is written atomically, loads, runs and keeps FP32's detections."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from support import run_cli, tiny_model
from torchvision.ops import box_iou

pytest.importorskip("openvino", reason="quantize needs openvino (the deploy extra), not installed")
pytest.importorskip("nncf", reason="quantize needs nncf (the deploy extra), not installed")

from maskrcnn import quantize  # noqa: E402
from maskrcnn.cli import main  # noqa: E402
from maskrcnn.errors import UserError  # noqa: E402
from maskrcnn.export import export_onnx  # noqa: E402
from maskrcnn.onnx_model import OnnxMaskRCNN  # noqa: E402
from maskrcnn.onnx_backends import openvino_core  # noqa: E402

# Random test images of several shapes, as the export tests use (the weights are random too).
SIZES = [(240, 320), (150, 100), (333, 333), (480, 640), (200, 260)]
# Of FP32's detections over SIZES, the share that int8 must keep: same class, box IoU >= 0.9. Measured on
# this model (2 calibration images): 44/50 (4 images: 42/50); with the calibration images left in 0..255
# instead of the graph's 0..1, with NNCF's default scope (the box decoding and post-processing quantized
# too), or with this model's FPN output convolutions (zero biases) quantized, 0/50: the RPN's ranking then
# changes entirely. The model with trained-like biases (`biased_tiny_model`), FPN outputs in int8: 46/50
# (with GroupNorm in the FPN instead, zero biases: 44/50).
MIN_KEPT = 0.7
BOX_IOU = 0.9
SCORE_TOLERANCE = 1e-3  # the matched scores differ by <= 7e-5 (the class logits stay in float32)


def write_images(folder, sizes, seed=0):
    """Write random RGB PNGs of `sizes` into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"im{i}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """The tiny export test model as .onnx and its int8 IR, calibrated through the command line on 2 images."""
    root = tmp_path_factory.mktemp("int8")
    onnx_path = export_onnx(tiny_model(), root / "tiny.onnx")
    write_images(root / "calibration", [(180, 240), (200, 240)])
    out = root / "out" / "tiny-int8.xml"
    done = run_cli("quantize", "--onnx", str(onnx_path), "--calibration", str(root / "calibration"), "--out", str(out))
    assert done.returncode == 0 and "layers in int8" in done.stdout, done.stderr[-2000:]
    return onnx_path, out


@pytest.fixture(scope="module")
def fp32(int8):
    """The .onnx file run by OpenVINO in float32: what int8 is compared with."""
    return OnnxMaskRCNN(int8[0], backend="openvino")


def biased_tiny_model():
    """The tiny model with the non-zero biases a trained one has in its FPN and RPN head (the seeded ones are 0)."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") and name.startswith(("backbone.fpn.", "rpn.")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def int8_inputs(xml, pattern: str) -> int:
    """Return how many convolutions of the IR `xml` whose names match `pattern` read a FakeQuantize (run in int8)."""
    return sum(1 for op in quantize.model_ops(openvino_core().read_model(str(xml)))
               if op.get_type_name() == "Convolution" and re.fullmatch(pattern, op.get_friendly_name())
               and op.input_value(0).get_node().get_type_name() == "FakeQuantize")


def kept_detections(fp32: OnnxMaskRCNN, int8: OnnxMaskRCNN) -> tuple[int, int]:
    """Return (FP32's detections with an int8 partner: same class, box IoU >= BOX_IOU, close score; all of them)."""
    kept = total = 0
    for size in SIZES:
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[0]))
        a, b = fp32([image])[0], int8([image])[0]
        assert abs(len(a["boxes"]) - len(b["boxes"])) <= 1, size
        total += len(a["boxes"])
        if len(a["boxes"]) and len(b["boxes"]):
            iou = box_iou(a["boxes"], b["boxes"]) * (a["labels"][:, None] == b["labels"][None])
            best, partner = iou.max(1)
            close = (a["scores"] - b["scores"][partner]).abs() <= SCORE_TOLERANCE
            kept += int(((best >= BOX_IOU) & close).sum())
    return kept, total


def test_int8_ir_is_written_and_runs_in_int8(int8, fp32):
    _, xml = int8
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert sorted(p.name for p in xml.parent.iterdir()) == ["tiny-int8.bin", "tiny-int8.xml"]  # no temp files
    model = OnnxMaskRCNN(xml, backend="openvino")
    assert model.runner.precision == "int8"
    assert model.class_names == fp32.class_names and len(model.class_names) == 3  # the metadata came along
    assert json.loads(model.runner.model.get_rt_info(quantize.RT_INFO_KEY).astype(str))["calibration_images"] == 2


def test_int8_keeps_fp32_detections(int8, fp32):
    kept, total = kept_detections(fp32, OnnxMaskRCNN(int8[1], backend="openvino"))
    assert total > 0 and kept >= MIN_KEPT * total, (kept, total)


def test_fpn_outputs_are_int8_when_biased(int8, tmp_path):
    """Trained FPN output convolutions (with a bias) run in int8 and keep FP32's detections, and so do ones a
    GroupNorm reads; the seeded test model's zero-bias ones stay float, which OpenVINO's CPU plugin computes
    wrong in int8 (see FPN_OUTPUTS)."""
    onnx_path, xml = int8
    assert len(quantize.unbiased_fpn_outputs(quantize.read_onnx(onnx_path))) == 4
    assert int8_inputs(xml, quantize.FPN_OUTPUTS) == 0
    group_norm = export_onnx(tiny_model(["model.backbone.fpn_norm=gn"]), tmp_path / "gn.onnx")
    assert quantize.unbiased_fpn_outputs(quantize.read_onnx(group_norm)) == []
    biased = export_onnx(biased_tiny_model(), tmp_path / "biased.onnx")
    assert quantize.unbiased_fpn_outputs(quantize.read_onnx(biased)) == []
    images = write_images(tmp_path / "calibration", [(180, 240), (200, 240)])
    out = tmp_path / "biased-int8.xml"
    done = run_cli("quantize", "--onnx", str(biased), "--calibration", str(images[0].parent), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int8_inputs(out, quantize.FPN_OUTPUTS) == 4
    reference, quantized = (OnnxMaskRCNN(path, backend="openvino") for path in (biased, out))
    kept, total = kept_detections(reference, quantized)
    assert total > 0 and kept >= MIN_KEPT * total, (kept, total)


def test_wrong_calibration_input_fails_the_closeness_check(int8, fp32, tmp_path):
    """The check above is not vacuous: images calibrated as 0..255 (the graph takes 0..1) lose every detection."""
    onnx_path, _ = int8
    images = write_images(tmp_path / "calibration", [(180, 240), (200, 240)])
    broken = tmp_path / "broken.xml"
    quantize.quantize_onnx(onnx_path, images, broken, preprocess=lambda p: quantize.calibration_array(p) * 255)
    kept, total = kept_detections(fp32, OnnxMaskRCNN(broken, backend="openvino"))
    assert kept < MIN_KEPT * total, (kept, total)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_calibration_input_errors(int8, tmp_path, capsys):
    onnx_path, _ = int8
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": []}))
    base = ["quantize", "--onnx", str(onnx_path), "--out", str(tmp_path / "m.xml")]
    cases = [
        (["--calibration", str(tmp_path / "missing")], f"calibration images '{tmp_path / 'missing'}' not found"),
        (["--calibration", str(empty)], f"no images in '{empty}' to calibrate with"),
        (["--calibration", f"{no_images}:{empty}"], "have no COCO 'images' list"),
        (["--calibration", str(empty), "--calibration-size", "0"], "--calibration-size 0: need at least one"),
    ]
    for args, message in cases:
        assert main(base + args) == 2, args
        assert message in one_line_error(capsys)
    assert main(["quantize", "--onnx", str(onnx_path), "--calibration", str(empty), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "must end in .xml" in one_line_error(capsys)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    write_images(tmp_path / "one", [(40, 50)])
    assert main(["quantize", "--onnx", str(garbage), "--calibration", str(tmp_path / "one"),
                 "--out", str(tmp_path / "m.xml")]) == 2
    assert f"OpenVINO cannot read '{garbage}'" in one_line_error(capsys)
    assert not (tmp_path / "m.xml").exists()


def test_unreadable_calibration_image_is_named(int8, tmp_path, capsys):
    onnx_path, _ = int8
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert main(["quantize", "--onnx", str(onnx_path), "--calibration", str(tmp_path / "cal"),
                 "--out", str(tmp_path / "m.xml")]) == 2
    assert "broken.png" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]  # nothing written, no temp files


def test_calibration_files_spread_over_the_set(tmp_path):
    paths = write_images(tmp_path / "many", [(8, 8)] * 10)
    assert quantize.calibration_files(tmp_path / "many", 3) == [paths[0], paths[3], paths[6]]
    assert quantize.calibration_files(tmp_path / "many", 50) == paths
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "im4.png"}, {"id": 2, "file_name": "im2.png"}]}))
    assert quantize.calibration_files(f"{ann}:{tmp_path / 'many'}", 5) == [paths[4], paths[2]]


def test_failed_save_leaves_the_old_files(int8, tmp_path, monkeypatch):
    """The .xml and .bin go through temp files and renames: a failed write keeps what was there."""
    import openvino

    _, xml = int8
    model = openvino_core().read_model(str(xml))
    out = tmp_path / "m.xml"
    out.write_text("old xml")
    out.with_suffix(".bin").write_text("old bin")

    def half_written(model, path, compress_to_fp16=True):
        with open(path, "w") as f:
            f.write("<net")
        raise RuntimeError("disk full")

    monkeypatch.setattr(openvino, "save_model", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize.save_ir(model, out)
    assert out.read_text() == "old xml" and out.with_suffix(".bin").read_text() == "old bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    monkeypatch.undo()
    quantize.save_ir(model, out)
    assert OnnxMaskRCNN(out, backend="openvino").runner.precision == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]


def test_precision_and_backend_choices_for_int8_files(int8, fp32, tmp_path, capsys):
    onnx_path, xml = int8
    with pytest.raises(UserError, match="is quantized to int8; run it without --precision"):
        OnnxMaskRCNN(xml, backend="openvino", precision="fp32")
    with pytest.raises(UserError, match="--precision int8 needs a file quantized by `maskrcnn quantize`"):
        OnnxMaskRCNN(onnx_path, backend="openvino", precision="int8")
    assert OnnxMaskRCNN(xml, backend="openvino", precision="int8").runner.precision == "int8"
    assert fp32.runner.precision == "fp32"  # no --precision: the file's own
    write_images(tmp_path / "in", [(64, 80)])
    predict = ["predict", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    assert main(predict + ["--backend", "onnxruntime", "--weights", str(xml)]) == 2
    assert "is an OpenVINO IR (from `maskrcnn quantize`); run it with --backend openvino" in one_line_error(capsys)
    assert main(predict + ["--weights", str(tmp_path / "none.xml")]) == 2
    assert f"OpenVINO IR '{tmp_path / 'none.xml'}' not found; write one with `maskrcnn quantize`" in one_line_error(capsys)
    assert main(predict + ["--weights", str(xml)]) == 0  # --backend auto
    err = capsys.readouterr().err
    assert f"--backend auto: running '{xml}' with OpenVINO" in err and "in int8" in err
    assert len(json.loads((tmp_path / "out" / "predictions.json").read_text())) > 0
