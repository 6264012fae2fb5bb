"""Stopping a run cleanly: on SIGINT/SIGTERM the loop finishes its iteration, saves a checkpoint, then raises.

Under torchrun every rank stops at the same iteration (`agree_across_ranks`).
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from maskrcnn import distributed as du

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised once the checkpoint a SIGINT/SIGTERM asked for is saved; `exit_status` is 128 + signal number."""

    def __init__(self, signal_name: str, path: Path) -> None:
        super().__init__(f"training stopped by {signal_name}; saved {path}")
        self.signal_name = signal_name
        self.path = path
        self.exit_status = 128 + int(signal.Signals[signal_name])


@contextmanager
def stop_on_signals() -> Iterator[dict[str, Any]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks between iterations.

    The handler restores the previous ones, so a second signal stops the process the usual way.
    """
    flag: dict[str, Any] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signal.Signals(signum).name
        for s, h in previous.items():
            signal.signal(s, h)
        log.warning("%s received: finishing this iteration and saving a checkpoint", flag["signal"])

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)



def agree_across_ranks(signal_name: str | None, data_error: Exception | None, seconds: float,
                       device: torch.device) -> tuple[int, str | None, float]:
    """Return (signal number or 0, every failing rank's data error or None, rank 0's training seconds).

    The same on every rank: one small all-reduce (max) before each step, so a SIGINT/SIGTERM that
    reached any rank stops all of them before this step, and an unreadable batch on any rank stops
    them all (with every failing rank's message), instead of leaving the others waiting in the
    gradient all-reduce.
    """
    main = du.get_rank() == 0
    flags = torch.tensor([float(signal.Signals[signal_name]) if signal_name else 0.0,
                          1.0 if data_error is not None else 0.0,
                          seconds if main else 0.0], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    signum, data_failed, agreed_seconds = flags.tolist()
    failure = None
    if data_failed:
        messages = du.all_gather_object(str(data_error) if data_error is not None else None)
        failure = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
    return int(signum), failure, agreed_seconds
