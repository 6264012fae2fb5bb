"""Data-loader worker processes, supervised: torch's SIGCHLD handler held back, dead workers restarted.

A `DataLoader` with worker processes installs a SIGCHLD handler that raises "worker exited unexpectedly"
wherever the main thread happens to be, e.g. half-way through an optimizer step. `SupervisedWorkers` holds
that handler back while the caller computes and runs it while waiting for the next batch, where a dead
worker can be dealt with: the loader is rebuilt at the batch it was about to deliver (`make_loader(iteration)`),
at most `max_restarts` times, then it raises `DataError`. Workers ignore Ctrl-C (`ignore_sigint`): it reaches
the whole process group, and only the main process should act on it.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader

from maskrcnn.errors import DataError

log = logging.getLogger("maskrcnn.data.loader")  # the train stream's: a restart is one of its warnings

# What torch says when a worker process vanished (as opposed to a worker re-raising an exception).
_WORKER_DIED = re.compile(r"DataLoader worker \(pid")


def ignore_sigint(_worker_id: int) -> None:
    """Worker init: Ctrl-C reaches the whole process group; only the main process should act on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SupervisedWorkers:
    """The batches of the loader `make_loader(iteration)` builds, its worker processes watched and restarted.

    `next_batch(iteration)` returns the loader's next batch, `iteration` being that batch's index (where a
    rebuilt loader starts); `restarts` counts rebuilds. `close()` stops the workers at once.
    """

    def __init__(self, make_loader: Callable[[int], DataLoader], start_iter: int, max_restarts: int) -> None:
        self._make_loader = make_loader
        self.max_restarts = max_restarts
        self.restarts = 0
        self._it: Iterator | None = None
        self._sigchld: Any = None  # the handler (torch's) deferred while the caller computes
        self._child_exited = False
        self._open(start_iter)

    def _open(self, iteration: int) -> None:
        loader = self._make_loader(iteration)
        self._num_workers = loader.num_workers
        self._it = iter(loader)
        if loader.num_workers > 0 and threading.current_thread() is threading.main_thread():
            # torch's SIGCHLD handler raises "worker exited unexpectedly" wherever the main thread
            # happens to be, e.g. half-way through an optimizer step. Hold it back while the caller
            # computes and run it inside next_batch, where a dead worker can be dealt with.
            current = signal.getsignal(signal.SIGCHLD)
            if getattr(current, "__func__", None) is SupervisedWorkers._note_child_exit:
                current = current.__self__._sigchld  # another stream holds it back already
            if callable(current):
                self._sigchld = current
            if self._sigchld is not None:
                signal.signal(signal.SIGCHLD, self._note_child_exit)

    def _note_child_exit(self, _signum: int, _frame: Any) -> None:
        self._child_exited = True

    def _shutdown(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # joins workers now rather than at GC time
        if shutdown is not None:
            shutdown()

    def close(self) -> None:
        """Stop the worker processes and give SIGCHLD back to its previous handler."""
        self._shutdown()
        if self._sigchld is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGCHLD) == self._note_child_exit:
                signal.signal(signal.SIGCHLD, self._sigchld)
            self._sigchld = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _fetch(self) -> Any:
        """Return the next raw batch, with torch's worker-death check active while waiting for it."""
        assert self._it is not None
        if self._sigchld is None:
            return next(self._it)
        signal.signal(signal.SIGCHLD, self._sigchld)
        try:
            if self._child_exited:
                self._child_exited = False
                self._sigchld(signal.SIGCHLD, None)  # raises now if one of the workers died meanwhile
            return next(self._it)
        finally:
            signal.signal(signal.SIGCHLD, self._note_child_exit)

    def _restart(self, error: str, iteration: int) -> None:
        self.restarts += 1
        reason = error.strip().splitlines()[0].split(". ")[0]  # drop torch's advice to rerun
        self._shutdown()
        if self.restarts > self.max_restarts:
            raise DataError(
                f"data-loader workers died {self.restarts} times (more than "
                f"data.max_worker_restarts={self.max_restarts}; the last: {reason}) while loading "
                f"the batch of iteration {iteration + 1}; check the memory available to workers, "
                "or set data.num_workers=0 to load images in the main process"
            ) from None
        log.warning("data-loader worker died (%s); restarting the loader at iteration %d (%d of at most "
                    "data.max_worker_restarts=%d)", reason, iteration + 1, self.restarts, self.max_restarts)
        self._open(iteration)

    def next_batch(self, iteration: int) -> Any:
        """Return the next batch (the one of `iteration`), restarting the loader there if a worker died."""
        while True:
            try:
                return self._fetch()
            except RuntimeError as e:
                if not _WORKER_DIED.search(str(e)):
                    raise
                self._restart(str(e), iteration)
            except (ConnectionError, EOFError) as e:
                # A worker that dies while handing over a batch breaks the transfer itself.
                if self._num_workers == 0:
                    raise
                self._restart(f"lost the connection to a worker ({type(e).__name__}: {e})", iteration)
