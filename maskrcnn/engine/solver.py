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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'")


class WarmupSchedule:
    """LR multiplier per iteration: linear warm-up from `warmup_factor`, then steps or cosine to 0.

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
        self.rescale(self.base_max_iter)

    def rescale(self, max_iter: int) -> None:
        """Fit the schedule into `max_iter` iterations: steps move proportionally, warm-up is capped."""
        self.max_iter = max(1, int(max_iter))
        ratio = self.max_iter / max(1, self.base_max_iter)
        self.steps = sorted(round(s * ratio) for s in self.base_steps)
        # Warm-up guards the first updates in absolute terms, so it is not scaled; it is only capped
        # so that a drastically shortened run still spends most of its time at full LR.
        self.warmup_iters = min(self.base_warmup_iters, self.max_iter // 2)

    def __call__(self, it: int) -> float:
        """Return the LR multiplier for iteration `it` (0-based)."""
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iter) / self.max_iter))
        else:
            factor = self.gamma ** bisect.bisect_right(self.steps, it)
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1.0 - alpha) + alpha
        return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SolverConfig, max_iter: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a per-iteration LambdaLR driven by a `WarmupSchedule` (step it once per iteration)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(cfg, max_iter))
