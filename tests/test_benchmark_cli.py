"""`maskrcnn benchmark`: the report's fields (not the times), the staged forward, the batch search."""

from __future__ import annotations

import json

import pytest
import torch
from support import run_cli

from maskrcnn.api import load_model
from maskrcnn.cli import main
from maskrcnn.engine.benchmark import STAGES, autocast_dtype, find_max_batch, parse_size, timed_forward
from maskrcnn.engine.precision import autocast_dtype as trainer_autocast_dtype
from maskrcnn.errors import UserError

SMALL = ["model.box_head.fc_dim=64", "model.mask_head.conv_dim=32", "model.rpn.post_nms_top_n_test=50"]


def test_benchmark_both_modes_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "b.json"
    status = main(["benchmark", "--config", "shapes", "--size", "96x128", "--runs", "2", "--warmup", "1",
                   "--mode", "both", "--batch", "2", "--json", str(out), *SMALL])
    assert status == 0
    printed = capsys.readouterr().out
    assert "whole forward" in printed and "images per second" in printed
    report = json.loads(out.read_text())
    assert report["size"] == [96, 128] and report["precision"] == "fp32" and report["mode"] == "both"
    inf = report["inference"]
    assert set(inf["stages"]) == set(STAGES)
    for stats in [inf["seconds_per_image"], *inf["stages"].values()]:
        assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert inf["runs"] == 2 and inf["warmup"] == 1
    assert inf["memory"]["peak_mb"] > 0
    assert len(inf["box_stages"]) == 1 and 0 < inf["box_stages"][0]["median"] <= inf["stages"]["roi_heads"]["max"]
    train = report["training"]
    assert train["batch"] == 2
    assert train["images_per_s"]["median"] > 0 and train["seconds_per_step"]["min"] > 0
    assert train["memory"]["peak_mb"] > 0 and train["memory"]["growth_mb"] >= 0


@pytest.mark.parametrize("config", ["shapes", "shapes-cascade"])
def test_timed_forward_gives_the_models_own_outputs(config):
    model = load_model(config, overrides=SMALL)
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 120)]
    with torch.inference_mode():
        expected = model(images)
        outputs, times = timed_forward(model, images)
    assert set(times) == set(STAGES) and all(t >= 0 for t in times.values())
    for a, b in zip(outputs, expected):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_cascade_report_times_each_box_stage(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["benchmark", "--config", "shapes-cascade", "--size", "96x128", "--runs", "2", "--warmup", "1",
                 "--json", str(out), *SMALL]) == 0
    assert "box stage 3" in capsys.readouterr().out
    inf = json.loads(out.read_text())["inference"]
    assert len(inf["box_stages"]) == 3
    assert sum(s["min"] for s in inf["box_stages"]) <= inf["stages"]["roi_heads"]["max"]


def test_fp16_on_cpu_falls_back_to_bf16_with_a_note():
    dtype, note = autocast_dtype("fp16", torch.device("cpu"))
    assert dtype == torch.bfloat16 and "bf16" in note
    assert autocast_dtype("fp32", torch.device("cpu")) == (None, None)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_takes_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr("maskrcnn.engine.precision.native_bf16", lambda device: native)
    dtype, note = trainer_autocast_dtype("auto", torch.device("cpu"))
    assert dtype == (torch.bfloat16 if native else None)
    assert (note is None) == native and (native or "float32" in note)
    # An explicit bf16 is kept either way, with a warning where it is emulated.
    dtype, note = trainer_autocast_dtype("bf16", torch.device("cpu"))
    assert dtype == torch.bfloat16 and (note is None) == native and (native or "emulated" in note)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_benchmark_times_an_exported_model(tmp_path, capsys, monkeypatch, backend):
    monkeypatch.setenv("MASKRCNN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b.json"
    common = ["benchmark", "--config", "shapes", "--size", "96x128", "--runs", "2", "--warmup", "1",
              "--backend", backend, *SMALL]
    # Out of process, keeping the runtimes out of the test process (a precaution: see support.run_cli).
    done = run_cli(*common, "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "whole forward" in done.stdout and "(not cached: random weights)" in done.stderr
    report = json.loads(out.read_text())
    assert report["backend"] == backend and report["mode"] == "inference" and report["precision"] == "fp32"
    inf = report["inference"]
    assert inf["runs"] == 2 and inf["warmup"] == 1 and inf["stages"] == {}
    assert 0 < inf["seconds_per_image"]["min"] <= inf["seconds_per_image"]["median"]
    assert inf["detections_per_image"] > 0 and inf["memory"]["peak_mb"] > 0
    assert not (tmp_path / "cache" / "exports").exists()  # random weights differ every run: nothing to reuse
    for extra, message in [(["--mode", "train"], "times inference only"), (["--precision", "fp16"], "fp16 is CUDA")]:
        assert main([*common, *extra]) == 2  # refused before any runtime loads
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1
