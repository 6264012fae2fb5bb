"""Shared fixtures: a tiny saved model for the command-line tests, a tiny shapes dataset, a stand-in model for
the trainer, a folder for artifacts. Plain helpers (configs, parity set-up, ...) are in support.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import maskrcnn.modeling
from maskrcnn.checkpoint import save_checkpoint
from maskrcnn.config import load_config
from maskrcnn.data.shapes import make_shapes
from maskrcnn.modeling import build_model
from support import TINY, StandInModel, alternate_stack


# Under CI=true (.ci/run installs what the tests need) a skipped test is a failure, except these: test id ->
# why it may skip there. pytest's summary (-rs) still names each skip and its reason.
SKIPS_ALLOWED_IN_CI = {
    "tests/test_export.py::test_openvino_bf16_only_where_native":
        "OpenVINO's bf16 runs only on a CPU with native bfloat16 (AVX-512 or AMX), which CI's may lack",
}


def in_ci() -> bool:
    """Whether the tests run under CI (CI=true, as CI services set it)."""
    return os.environ.get("CI", "").lower() == "true"


def fail_skip_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Turn `report` into a failure if it is a skip that CI does not allow (xfail is no skip)."""
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail") or report.nodeid in SKIPS_ALLOWED_IN_CI:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"CI=true and this was skipped ({reason}); install what it needs in .ci/run, "
                       f"or add it to SKIPS_ALLOWED_IN_CI in tests/conftest.py with the reason")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    fail_skip_in_ci((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    fail_skip_in_ci((yield).get_result())  # a module that skips itself (pytest.importorskip)


@pytest.fixture(autouse=True)
def alternate_stack_stays_mapped(request):
    """Stop the run at a test that leaves the main thread's alternate signal stack unmapped: otherwise the next
    signal that a Python handler catches kills pytest with SIGSEGV at some later, unrelated test (as OpenVINO's
    CPU plugin did before `maskrcnn.onnx_backends.openvino_core`; tests/test_signal_stack.py)."""
    yield
    stack = alternate_stack()
    if stack["enabled"] and not stack["mapped"]:
        pytest.exit(f"{request.node.nodeid} left the main thread's alternate signal stack unmapped "
                    f"(at {stack['address']:#x}); the next signal would kill the test process", returncode=1)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny shapes model saved as one of our checkpoints (its config inside)."""
    torch.manual_seed(0)
    cfg = load_config("shapes", TINY)
    model = build_model(cfg)
    with torch.no_grad():  # confident enough that a few boxes pass the score threshold
        model.roi_heads.box_predictor.class_logits.bias.copy_(torch.tensor([-3.0, 3.0, 0.0, 0.0]))
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "iteration": 0})
    return path


@pytest.fixture
def artifacts(request) -> Path:
    """A folder for files a person may want to see after the run (screenshots), one per test: under
    $MASKRCNN_TEST_ARTIFACTS, else runs/test-artifacts/ in the repository (git ignores runs/)."""
    root = os.environ.get("MASKRCNN_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"
    folder = Path(root) / request.node.name
    shutil.rmtree(folder, ignore_errors=True)  # only this run's files
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Six 48-px training images and two validation images, written once per test module."""
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes(root, num_train=6, num_val=2, seed=0, image_size=48, max_shapes=2, shape_size=(12, 24))


@pytest.fixture
def stand_in_model(monkeypatch) -> type[StandInModel]:
    """Make the trainer build a StandInModel (support.py) instead of Mask R-CNN; return the class to set its hook."""
    monkeypatch.setattr(maskrcnn.modeling, "build_model", lambda cfg: StandInModel(), raising=False)
    monkeypatch.setattr(StandInModel, "hook", None)
    return StandInModel
