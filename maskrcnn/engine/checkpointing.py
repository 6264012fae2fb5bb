"""A training run's checkpoints: which one to resume from, saving with rotation, and loading one back.

Layout: `<output_dir>/checkpoints/model_XXXXXXX.pth` (the newest KEEP_CHECKPOINTS periodic ones) and
`model_final.pth`. Every file is written atomically (`maskrcnn.checkpoint.save_checkpoint`), so a
kill leaves at most a hidden temp file, which the next run removes.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskrcnn import distributed as du
from maskrcnn.checkpoint import TMP_SUFFIX, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from maskrcnn.errors import TrainingError, UserError

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3  # periodic checkpoints kept besides model_final.pth


class RunCheckpoints:
    """The checkpoints/ folder of one run, and the last checkpoint written there (where progress is safe)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = out / "checkpoints"
        self.last: Path | None = None
        self.saved_iteration = 0  # the iteration `last` holds

    def prepare(self, resume: bool) -> Path | None:
        """Create the run directory, clear temp files of killed saves; return the checkpoint to resume."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(f".*{TMP_SUFFIX}"):
            log.info("removing %s left by an interrupted save", tmp.name)
            tmp.unlink(missing_ok=True)
        existing = list_checkpoints(self.dir)
        if not resume:
            if existing:
                raise UserError(
                    f"'{self.out}' already holds checkpoints; pass --resume to continue that run, "
                    "or choose another output directory (--out)"
                )
            return None
        path = latest_checkpoint(self.dir)
        if path is None and existing:
            raise TrainingError(
                f"--resume: none of the {len(existing)} checkpoints in '{self.dir}' is complete "
                f"({', '.join(p.name for p in existing[:5])}: truncated or corrupt); move them away to start "
                "from scratch, or copy an intact checkpoint there"
            )
        if path is None:
            log.warning("--resume: no checkpoint in %s yet; starting from scratch", self.dir)
        return path

    def agreed_resume_path(self, resume: bool, world_size: int) -> Path | None:
        """Return the checkpoint to resume from: rank 0 prepares the run directory and decides for all."""
        if world_size == 1:
            return self.prepare(resume)
        outcome: tuple[Path | None, Exception | None] = (None, None)
        if du.get_rank() == 0:
            try:
                outcome = (self.prepare(resume), None)
            except UserError as e:
                outcome = (None, e)
        path, error = du.broadcast_object(outcome)
        if error is not None:
            raise du.on_all_ranks(error)
        return path

    def last_good(self) -> str:
        """Return where the user's progress is safe, for error messages."""
        if self.last is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.last} (iteration {self.saved_iteration})"

    def mark_saved(self, path: Path, iteration: int) -> Path:
        """Remember `path` (holding `iteration`) as the last good checkpoint; return it."""
        self.last, self.saved_iteration = path, iteration
        return path

    def write(self, name: str, state: dict[str, Any], iteration: int) -> Path:
        """Write `state` as checkpoints/`name`, and prune old periodic checkpoints.

        A failed write (disk full, quota, I/O error) leaves no temp file and no damaged checkpoint
        behind and stops the run with a TrainingError: continuing would only pile up unsaved work.
        """
        try:
            path = save_checkpoint(self.dir / name, state)
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            hint = "free some disk space" if e.errno in full else "check the output directory"
            raise TrainingError(
                f"cannot write checkpoint '{self.dir / name}': {reason}; training stopped at iteration "
                f"{iteration} and {self.last_good()}; {hint}, then continue with --resume"
            ) from None
        self.mark_saved(path, iteration)
        periodic = sorted(p for p in self.dir.glob("model_*.pth") if p.stem[6:].isdigit())
        for old in periodic[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: torch.amp.GradScaler, rank: int, config_path: Path) -> dict[str, Any]:
    """Load model, optimizer, scheduler and scaler from checkpoint `path`; return the whole checkpoint.

    The caller restores the rest (progress counters, RNG) from what is returned. A model that does
    not fit the checkpoint is a UserError that points at the config the run started with.
    """
    if not path.is_file():
        raise TrainingError(
            f"rank {rank} cannot read '{path}', the checkpoint rank 0 resumes from; with several "
            "machines, output_dir must be on a filesystem they all share")
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        first = lines[1] if len(lines) > 1 else lines[0]  # skip torch's "Error(s) in loading..." header
        raise UserError(
            f"checkpoint '{path}' does not fit the configured model ({first[:200]}); resume with the "
            f"config the run started with (saved as {config_path})"
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    return state
