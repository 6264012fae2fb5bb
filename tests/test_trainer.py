"""The training loop with a stand-in model (fast): non-finite losses, signals, time budget, outputs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

import maskrcnn.modeling
from conftest import quick_run_config
from maskrcnn.checkpoint import load_checkpoint
from maskrcnn.config import load_config
from maskrcnn.engine.trainer import TrainingError, train
from maskrcnn.errors import UserError


class _FakeModel(nn.Module):
    """Returns the contract's loss dict from one parameter; `hook(call)` may inject trouble."""

    hook = None

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.calls = 0

    def forward(self, images, targets=None):
        self.calls += 1
        scale = _FakeModel.hook(self.calls) if _FakeModel.hook else 1.0
        base = (self.w**2).sum() * scale
        return {"loss_classifier": base, "loss_box_reg": base * 0.5, "loss_mask": base * 0.1,
                "loss_objectness": base * 0.2, "loss_rpn_box_reg": base * 0.3}


@pytest.fixture
def cfg(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(maskrcnn.modeling, "build_model", lambda cfg: _FakeModel(), raising=False)
    monkeypatch.setattr(_FakeModel, "hook", None)
    return quick_run_config(shapes, tmp_path / "run", ["input.horizontal_flip=0.5"])


def test_outputs_and_classes_from_data(cfg):
    out = train(cfg)
    assert cfg.model.class_names == ["square", "circle", "triangle"] and cfg.model.num_classes == 3
    assert (out / "config.yaml").read_text().count("triangle") == 1
    state = load_checkpoint(out / "checkpoints" / "model_final.pth")
    assert state["iteration"] == 6 and state["config"]["model"]["num_classes"] == 3
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 4, 6]
    assert {"loss", "loss_mask", "lr"} <= set(records[-1])
    with pytest.raises(UserError, match="--resume"):
        train(cfg)  # a finished run is never overwritten silently


def test_non_finite_loss_names_iteration_and_keeps_checkpoint(cfg, monkeypatch):
    monkeypatch.setattr(_FakeModel, "hook", lambda call: float("nan") if call == 5 else 1.0)
    with pytest.raises(TrainingError) as e:
        train(cfg)
    msg = str(e.value)
    assert "non-finite loss at iteration 5" in msg and "loss_classifier=nan" in msg
    assert "model_0000004.pth" in msg
    ckpt = load_checkpoint(cfg.output_dir + "/checkpoints/model_0000004.pth")
    assert ckpt["iteration"] == 4 and torch.isfinite(ckpt["model"]["w"]).all()


def test_sigint_saves_and_resume_finishes(cfg, monkeypatch):
    def interrupt(call):
        if call == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-iteration: the iteration still completes
        return 1.0

    monkeypatch.setattr(_FakeModel, "hook", interrupt)
    with pytest.raises(KeyboardInterrupt) as e:
        train(cfg)
    assert e.value.exit_status == 128 + signal.SIGINT and e.value.path.name == "model_0000003.pth"
    assert load_checkpoint(cfg.output_dir + "/checkpoints/model_0000003.pth")["iteration"] == 3
    monkeypatch.setattr(_FakeModel, "hook", None)
    out = train(cfg, resume=True)
    assert load_checkpoint(out / "checkpoints" / "model_final.pth")["iteration"] == 6
    iters = [json.loads(l)["iter"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert iters == sorted(iters) and len(iters) == len(set(iters))


def test_time_budget_shortens_schedule(cfg):
    cfg.solver.max_iter = 100_000
    cfg.solver.steps = [60_000, 80_000]
    cfg.solver.max_minutes = 0.01  # 0.6 s
    cfg.solver.checkpoint_period = 1_000_000
    out = train(cfg)
    state = load_checkpoint(out / "checkpoints" / "model_final.pth")
    schedule = state["scheduler"]["lr_lambdas"][0]
    assert 12 <= state["iteration"] < 100_000
    assert schedule["max_iter"] == state["iteration"]


def test_time_budget_never_raises_the_learning_rate_again(cfg, monkeypatch):
    """Iterations that speed up mid-run must not stretch the schedule (the cosine LR would climb back)."""
    import time

    def slow_then_fast(call: int) -> float:
        time.sleep(0.08 if call < 24 else 0.002)
        return 1.0

    monkeypatch.setattr(_FakeModel, "hook", slow_then_fast)
    cfg.solver.max_iter = 100_000
    cfg.solver.schedule = "cosine"
    cfg.solver.max_minutes = 0.05  # 3 s
    cfg.solver.log_period = 1
    cfg.solver.checkpoint_period = 1_000_000
    out = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r and r["iter"] > cfg.solver.warmup_iters]
    assert len(lrs) > 20
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), lrs
