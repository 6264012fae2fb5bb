"""benchmarks/gpu_check.py, the GPU path's one-command check, run on the CPU: its report, its error handling,
and the largest-batch search's recovery from out-of-memory errors (which only a GPU raises for real)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from support import benchmark_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return benchmark_script("gpu_check")


class FitsUpTo(nn.Module):
    """A trainable stand-in that raises CUDA's out-of-memory error for batches over `capacity` images."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, images, targets):
        if len(images) > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory ({len(images)} images)")
        return {"loss": (self.weight * len(images)).sum()}


def test_largest_batch_recovers_from_out_of_memory_and_bisects(gpu_check):
    model = FitsUpTo(5)
    device = torch.device("cpu")
    found = gpu_check.largest_batch(lambda b: gpu_check.training_fits(model, b, (32, 32), None, device, 2),
                                    start=2, limit=64)
    assert found["largest"] == 5 and found["first_failure"] == 6
    assert [(t["batch"], t["fits"]) for t in found["tried"]] == [(2, True), (4, True), (8, False), (6, False), (5, True)]
    assert all(p.grad is None for p in model.parameters())  # the failed step's gradients were freed
    # A coarser resolution stops bisecting sooner; a start that does not fit bisects down; the limit caps it.
    assert gpu_check.largest_batch(lambda b: b <= 5, start=2, limit=64, resolution=0.5)["largest"] == 4
    assert gpu_check.largest_batch(lambda b: b <= 1, start=8, limit=64)["largest"] == 1
    capped = gpu_check.largest_batch(lambda b: True, start=2, limit=3)
    assert capped["largest"] == 3 and capped["first_failure"] is None


def test_a_failing_step_is_reported_and_the_others_still_run(gpu_check):
    ran = []

    def step(name, outcome):
        def run():
            ran.append(name)
            if outcome == "raise":
                raise ValueError("broken")
            return {"problems": ["too slow"]} if outcome == "problems" else {"value": 1}
        return run

    steps = {"a": step("a", "ok"), "b": step("b", "raise"), "c": step("c", "problems"), "d": step("d", "ok")}
    records = gpu_check.run_steps(steps, fail_step="d")
    assert ran == ["a", "b", "c"]  # d was made to fail before it ran
    assert [r["status"] for r in records.values()] == ["ok", "failed", "failed", "failed"]
    assert records["a"]["result"] == {"value": 1}
    assert records["b"]["error"] == "ValueError: broken" and "Traceback" in records["b"]["traceback"]
    assert records["c"]["error"] == "too slow" and records["c"]["result"]["problems"] == ["too slow"]
    assert "injected failure" in records["d"]["error"]


def test_shapes_run_problems_are_named(gpu_check):
    ok = {"iterations": 4, "losses": [3.0, 2.8, 2.5, 2.2], "nonfinite_skipped": 0}
    assert gpu_check.shapes_problems(dict(ok), 4) == []
    assert "did not go down" in gpu_check.shapes_problems({**ok, "losses": [2.0, 2.5, 2.8, 3.0]}, 4)[0]
    assert "non-finite" in gpu_check.shapes_problems({**ok, "losses": [3.0, math.nan, 2.5, 2.2]}, 4)[0]
    assert "of 4 iterations" in gpu_check.shapes_problems({**ok, "iterations": 3, "losses": [3.0, 2.0, 1.0]}, 4)[0]


def test_cpu_quick_run_reports_every_step(tmp_path):
    """The whole script, as `make test` runs it on every commit: all steps with small sizes, one made to fail."""
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                           "--fail-step", "environment"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a step failed: status 1
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert list(steps) == list(benchmark_script("gpu_check").STEPS) and report["failed"] == ["environment"]
    assert "injected failure" in steps["environment"]["error"]
    failed = {k: v.get("error") for k, v in steps.items() if k != "environment" and v["status"] != "ok"}
    assert not failed, failed
    for name in ("parity", "cpu_vs_device"):
        (image,) = steps[name]["result"]["images"]
        assert image["expected"] > 0 and image["matched"] == image["expected"]
    inference, training = steps["inference"]["result"]["rows"], steps["training"]["result"]["rows"]
    assert {(r["implementation"], r["precision"], r["batch"]) for r in inference} == {
        (i, p, b) for i in ("torchvision", "maskrcnn") for p in ("fp32", "bf16") for b in (1, 2)}
    assert all(r["images_per_s"] > 0 and r["latency_ms"] > 0 for r in inference)
    assert len(steps["inference"]["result"]["best"]) == 4
    assert {(r["implementation"], r["precision"], r["batch"]) for r in training} == {
        (i, p, b) for i in ("torchvision", "maskrcnn") for p in ("fp32", "bf16") for b in (1, 2)}
    largest = steps["largest_batch"]["result"]["rows"]
    assert len(largest) == 4 and all(r["largest"] == 2 and r["first_failure"] is None for r in largest)
    shapes = steps["shapes"]["result"]
    assert shapes["iterations"] == 8 and shapes["nonfinite_skipped"] == 0 and shapes["last_loss"] < shapes["first_loss"]
    assert not shapes["loss_scaling"]  # FP16 loss scaling is CUDA's; the CPU trains in BF16
    torchrun = steps["torchrun"]["result"]
    assert torchrun["backend"] == "gloo" and torchrun["all_reduce"] == 1.0 and torchrun["iterations"] == 2
    page = (out / "report.md").read_text()
    assert "| environment | failed |" in page and "| torchrun | ok |" in page
    for title in ("## Parity", "## Inference, 96x128", "## Training", "## Largest training batch", "## The shapes recipe",
                  "## torchrun"):
        assert title in page
