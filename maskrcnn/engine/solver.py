"""Optimizer (SGD / AdamW with optional no-decay groups) and the warm-up + step/cosine LR schedule."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from maskrcnn.config import SolverConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    """Return True for normalisation layers, including custom ones named like `FrozenBatchNorm2d`."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def param_groups(model: nn.Module, cfg: SolverConfig) -> list[dict]:
    """Return optimizer groups: trainable params, split off to weight_decay 0 for norms and biases."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # frozen stages; shared params once
                continue
            seen.add(id(p))
            if not cfg.weight_decay_norm_bias and (norm or name == "bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    """Return SGD (momentum) or AdamW over the model's trainable parameters."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters (are all stages frozen?)")
    # PyTorch's fused kernels update every parameter in one pass (AdamW on the `shapes` model: 11 ms a
    # step instead of 44 on 2 CPU cores); they need floating-point parameters on the CPU or a GPU.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr, fused=fused)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'")


class WarmupSchedule:
    """LR multiplier per iteration: linear warm-up from `warmup_factor`, then steps or cosine to 0.

    Two clocks: iterations (`it / max_iter`) or, under a time budget (`solver.max_minutes`), the
    elapsed share of the budget (`budget_fraction`, set by the trainer), whichever is further along.
    On the budget clock the warm-up and the steps keep their share of the configured schedule
    (warm-up 100 of 3000 iterations = the first 3.3% of the budget), and since elapsed time only
    grows, the learning rate never climbs back when the speed estimate changes.

    A callable object rather than a closure so that LambdaLR's state_dict saves its fields (plain
    numbers) and a resumed run gets back a schedule that `rescale` may have shortened.
    """

    def __init__(self, cfg: SolverConfig, max_iter: int | None = None) -> None:
        self.kind = cfg.schedule
        self.base_max_iter = int(max_iter or cfg.max_iter)
        self.base_steps = [int(s) for s in cfg.steps]
        self.base_warmup_iters = int(cfg.warmup_iters)
        self.gamma = float(cfg.gamma)
        self.warmup_factor = float(cfg.warmup_factor)
        self.budget_fraction: float | None = None  # None: iterations only
        self.rescale(self.base_max_iter)

    def rescale(self, max_iter: int) -> None:
        """Fit the schedule into `max_iter` iterations: steps move proportionally, warm-up is capped."""
        self.max_iter = max(1, int(max_iter))
        ratio = self.max_iter / max(1, self.base_max_iter)
        self.steps = sorted(round(s * ratio) for s in self.base_steps)
        # Warm-up guards the first updates in absolute terms, so it is not scaled; it is only capped
        # so that a drastically shortened run still spends most of its time at full LR.
        self.warmup_iters = min(self.base_warmup_iters, self.max_iter // 2)

    def progress(self, it: int) -> float:
        """Return how far along the run is at iteration `it`, in 0..1, on the further of the two clocks."""
        return max(min(it, self.max_iter) / self.max_iter, min(1.0, self.budget_fraction or 0.0))

    def __call__(self, it: int) -> float:
        """Return the LR multiplier for iteration `it` (0-based)."""
        if self.budget_fraction is None:
            warmed = it / self.warmup_iters if self.warmup_iters > 0 else 1.0
            return self._factor(min(it, self.max_iter) / self.max_iter, warmed, bisect.bisect_right(self.steps, it))
        done = self.progress(it)
        warmup = self.base_warmup_iters / self.base_max_iter
        steps = [s / self.base_max_iter for s in self.base_steps]
        return self._factor(done, done / warmup if warmup > 0 else 1.0, bisect.bisect_right(steps, done))

    def _factor(self, done: float, warmed: float, steps_passed: int) -> float:
        """Return the multiplier `done` (0..1) through the run, `warmed` (0..1+) through the warm-up."""
        factor = 0.5 * (1.0 + math.cos(math.pi * done)) if self.kind == "cosine" else self.gamma ** steps_passed
        if warmed < 1.0:
            factor *= self.warmup_factor * (1.0 - warmed) + warmed
        return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SolverConfig, max_iter: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a per-iteration LambdaLR driven by a `WarmupSchedule` (step it once per iteration)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(cfg, max_iter))
