"""Fitting a run into a time budget (`solver.max_minutes`).

The learning rate follows the elapsed share of the budget (see `solver.WarmupSchedule`), and the run
stops when the budget is spent, so no speed estimate is needed and none can go wrong. Training time is
summed over resumed sessions (the checkpoint keeps it), and under torchrun rank 0's clock decides.
"""

from __future__ import annotations

import logging

from maskrcnn.engine.metrics import format_seconds
from maskrcnn.engine.solver import WarmupSchedule

log = logging.getLogger(__name__)


class TimeBudget:
    """The budget of `minutes` (0: none, the schedule runs on iterations alone) and the schedule it drives."""

    def __init__(self, minutes: float, schedule: WarmupSchedule, train_seconds: float) -> None:
        self.minutes = minutes
        self.seconds = minutes * 60
        self.schedule = schedule
        self.advance(train_seconds)

    @property
    def on(self) -> bool:
        """Whether a budget is set."""
        return self.seconds > 0

    def describe(self) -> str:
        """Return how long the run is meant to be, for the first log line."""
        if not self.on:
            return f"{self.schedule.max_iter} iterations"
        return (f"{self.minutes:g} minutes (solver.max_minutes; schedule on the elapsed share of the "
                f"budget, at most {self.schedule.max_iter} iterations)")

    def advance(self, train_seconds: float) -> None:
        """Move the schedule's clock to `train_seconds` (the LR of the next update follows it)."""
        if self.on:
            self.schedule.budget_fraction = train_seconds / self.seconds

    def eta(self, iteration: int, train_seconds: float, sec_per_iter: float) -> float:
        """Return the seconds left: of the budget, or at this speed to max_iter."""
        if self.on:
            return max(0.0, self.seconds - train_seconds)
        return sec_per_iter * (self.schedule.max_iter - iteration)

    def spent(self, train_seconds: float) -> bool:
        """Whether the budget is used up after `train_seconds` of training."""
        return self.on and train_seconds >= self.seconds

    def report(self, train_seconds: float, iteration: int) -> None:
        """Log how much of the budget the finished run used."""
        if self.on:
            log.info("time budget: %s of solver.max_minutes=%g spent (%.0f%%), %d iterations at %.2f s each",
                     format_seconds(train_seconds), self.minutes, 100 * train_seconds / self.seconds,
                     iteration, train_seconds / max(1, iteration))
