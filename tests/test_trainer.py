"""The training loop with a stand-in model (fast): non-finite losses, signals, time budget, outputs."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from support import StandInModel, quick_run_config
from maskrcnn.checkpoint import load_checkpoint
from maskrcnn.engine.trainer import train
from maskrcnn.errors import TrainingError, UserError


@pytest.fixture
def cfg(shapes, tmp_path, stand_in_model):
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
    monkeypatch.setattr(StandInModel, "hook", lambda call: float("nan") if call == 5 else 1.0)
    with pytest.raises(TrainingError) as e:
        train(cfg)
    msg = str(e.value)
    assert "non-finite loss at iteration 5" in msg and "loss_classifier=nan" in msg
    assert "model_0000004.pth" in msg
    ckpt = load_checkpoint(cfg.output_dir + "/checkpoints/model_0000004.pth")
    assert ckpt["iteration"] == 4 and all(torch.isfinite(ckpt["model"][k]).all() for k in ("trunk", "head"))


def test_sigint_saves_and_resume_finishes(cfg, monkeypatch):
    def interrupt(call):
        if call == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-iteration: the iteration still completes
        return 1.0

    monkeypatch.setattr(StandInModel, "hook", interrupt)
    with pytest.raises(KeyboardInterrupt) as e:
        train(cfg)
    assert e.value.exit_status == 128 + signal.SIGINT and e.value.path.name == "model_0000003.pth"
    assert load_checkpoint(cfg.output_dir + "/checkpoints/model_0000003.pth")["iteration"] == 3
    monkeypatch.setattr(StandInModel, "hook", None)
    out = train(cfg, resume=True)
    assert load_checkpoint(out / "checkpoints" / "model_final.pth")["iteration"] == 6
    iters = [json.loads(l)["iter"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert iters == sorted(iters) and len(iters) == len(set(iters))


def test_time_budget_is_spent_and_ends_the_schedule(cfg, monkeypatch):
    """The run trains until the budget is spent (not a fitted guess short of it), and the LR ends at ~0."""
    import time

    step = 0.02  # every iteration sleeps this long, so the budget fits at most 1.8 / step of them
    monkeypatch.setattr(StandInModel, "hook", lambda call: time.sleep(step) or 1.0)
    cfg.solver.max_iter = 100_000
    cfg.solver.steps = [60_000, 80_000]
    cfg.solver.schedule = "cosine"
    cfg.solver.max_minutes = 0.03  # 1.8 s
    cfg.solver.log_period = 1
    cfg.solver.checkpoint_period = 1_000_000
    out = train(cfg)
    state = load_checkpoint(out / "checkpoints" / "model_final.pth")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_seconds = max(r["time"] for r in records if "time" in r)
    assert 1.8 <= state["train_seconds"] <= 1.8 + step_seconds + 0.05
    iterations = state["iteration"]
    assert state["scheduler"]["lr_lambdas"][0]["max_iter"] == iterations
    # It stops at the first iteration that ends past the budget: the ones before it ended inside it.
    assert (iterations - 1) * step < 1.8
    assert [r["iter"] for r in records if "time" in r] == list(range(1, iterations + 1))
    assert sum(r["time"] for r in records if "time" in r) <= state["train_seconds"]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[-1] < 0.01 * max(lrs)  # the cosine reached its end with the budget, not at iteration 100 000


def test_time_budget_never_raises_the_learning_rate_again(cfg, monkeypatch):
    """Iterations that speed up mid-run must not stretch the schedule (the cosine LR would climb back)."""
    import time

    def slow_then_fast(call: int) -> float:
        time.sleep(0.08 if call < 24 else 0.002)
        return 1.0

    monkeypatch.setattr(StandInModel, "hook", slow_then_fast)
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


def test_time_budget_warm_up_is_a_share_of_the_budget(cfg, monkeypatch):
    """Under a budget the warm-up lasts warmup_iters/max_iter of the time, however many iterations fit."""
    import time

    monkeypatch.setattr(StandInModel, "hook", lambda call: time.sleep(0.01) or 1.0)
    cfg.solver.max_iter = 1000
    cfg.solver.warmup_iters = 250  # a quarter of the schedule: the first 0.6 s of a 2.4 s budget
    cfg.solver.warmup_factor = 0.001
    cfg.solver.schedule = "cosine"
    cfg.solver.max_minutes = 0.04
    cfg.solver.log_period = 1
    cfg.solver.checkpoint_period = 1_000_000
    out = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    peak = max(range(len(records)), key=lambda i: records[i]["lr"])
    share = sum(r["time"] for r in records[: peak + 1]) / sum(r["time"] for r in records)
    assert 0.18 <= share <= 0.35, (share, peak, len(records))
    assert records[peak]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 4)), rel=0.15)
