"""Optimizer groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maskrcnn.config import SolverConfig
from maskrcnn.engine.solver import WarmupSchedule, build_lr_scheduler, build_optimizer


def _lrs(cfg: SolverConfig, n: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.base_lr)
    sched = build_lr_scheduler(opt, cfg)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_steps():
    cfg = SolverConfig(base_lr=1.0, max_iter=10, steps=[6, 8], gamma=0.1, warmup_iters=4, warmup_factor=0.2)
    lrs = _lrs(cfg, 10)
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4:] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_cosine_reaches_zero_at_max_iter():
    cfg = SolverConfig(base_lr=2.0, max_iter=100, schedule="cosine", warmup_iters=0)
    s = WarmupSchedule(cfg)
    assert s(0) == pytest.approx(1.0)
    assert s(50) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_rescale_moves_steps_and_caps_warmup():
    s = WarmupSchedule(SolverConfig(max_iter=1000, steps=[600, 800], warmup_iters=300))
    s.rescale(100)
    assert s.steps == [60, 80] and s.warmup_iters == 50 and s.max_iter == 100


def test_schedule_state_survives_scheduler_state_dict():
    cfg = SolverConfig(max_iter=1000, steps=[600, 800])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_lr_scheduler(opt, cfg)
    sched.lr_lambdas[0].rescale(200)
    state = sched.state_dict()
    fresh = build_lr_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), cfg)
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].steps == [120, 160]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_no_decay_groups_for_norms_and_biases():
    m = _Tiny()
    opt = build_optimizer(m, SolverConfig(weight_decay=1e-4, weight_decay_norm_bias=False))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m.conv.weight), id(m.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m.conv.bias), id(m.norm.weight), id(m.norm.bias)}
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_single_group_by_default_and_adamw():
    m = _Tiny()
    opt = build_optimizer(m, SolverConfig(optimizer="adamw", base_lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    assert len(opt.param_groups[0]["params"]) == 5  # frozen params are left out
