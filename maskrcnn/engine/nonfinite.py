"""The non-finite-loss policy (`solver.nonfinite`): stop at a NaN/inf loss or gradient, or skip that update."""

from __future__ import annotations

import logging

import torch
from torch import nn

from maskrcnn import distributed as du
from maskrcnn.config import SolverConfig
from maskrcnn.errors import TrainingError, UserError

log = logging.getLogger(__name__)


class NonFinitePolicy:
    """"stop" raises TrainingError; "skip" counts skipped updates, up to solver.max_nonfinite_skips in a row."""

    def __init__(self, solver: SolverConfig) -> None:
        if solver.nonfinite not in ("stop", "skip"):
            raise UserError(f"config key 'solver.nonfinite' = {solver.nonfinite!r} is not one of ['stop', 'skip']")
        self.skip = solver.nonfinite == "skip"
        self.max_skips = solver.max_nonfinite_skips
        self.in_a_row = 0  # consecutive skipped updates
        self.skipped = 0  # ... and all of them in this session

    def handle(self, what: str, detail: str, iteration: int, last_good: str) -> None:
        """Raise TrainingError for a non-finite `what` at `iteration`, or count a skipped update."""
        advice = ("Try a lower solver.base_lr, a longer solver.warmup_iters or solver.clip_grad_norm"
                  + ("" if self.skip else ", or solver.nonfinite=skip to skip such updates"))
        if self.skip:
            self.in_a_row += 1
            self.skipped += 1
            if self.in_a_row <= self.max_skips:
                log.warning("%s at iteration %d: %s; update skipped (%d in a row, at most "
                            "solver.max_nonfinite_skips=%d; %d in this run)", what, iteration, detail,
                            self.in_a_row, self.max_skips, self.skipped)
                return
            raise du.on_all_ranks(TrainingError(
                f"{what} at iteration {iteration}: {detail}; {self.in_a_row} updates in a row skipped, more "
                f"than solver.max_nonfinite_skips={self.max_skips}; training stopped and {last_good}. " + advice
            ))
        raise du.on_all_ranks(TrainingError(f"{what} at iteration {iteration}: {detail}; training stopped and "
                                            f"{last_good}. {advice}"))

    def stepped(self) -> None:
        """Note an update that went through: the count of skips in a row starts again."""
        self.in_a_row = 0


def first_nonfinite_grad(model: nn.Module) -> str:
    """Return the name of the first parameter whose gradient holds a NaN or inf."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return "?"


def check_buffers(model: nn.Module, iteration: int, last_good: str) -> None:
    """Raise TrainingError if a floating buffer (BatchNorm statistics) holds a NaN or inf.

    The forward pass itself may have written NaNs into buffers; skipping the update cannot undo
    that, so such a step cannot be skipped safely.
    """
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not torch.isfinite(buf).all():
            raise TrainingError(
                f"non-finite values reached buffer '{name}' at iteration {iteration}, so the step "
                f"cannot be skipped; training stopped and {last_good}. Try a lower solver.base_lr, "
                "a longer solver.warmup_iters or solver.clip_grad_norm"
            )
