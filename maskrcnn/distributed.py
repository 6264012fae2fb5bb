"""torch.distributed for training and evaluation: joining torchrun's process group, rank helpers,
object gathering, and a watchdog so that one failing process ends the whole job instead of hanging it.

Launch with PyTorch's own launcher, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for every process (docs/distributed.md):

    torchrun --nproc-per-node 8 -m maskrcnn.cli train --config R50-FPN-1x ...

Without those variables (or with WORLD_SIZE=1) everything here is a no-op: rank 0 of 1.

How a failure ends the job. Every process runs a watchdog thread that (a) bumps its own heartbeat
counter in the rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT) every second, (b) watches
the next rank's counter (a ring, so the store sees a few requests per process per second whatever
the world size), and (c) watches one `failed` key. A process whose code raises writes
"rank R: <error>" to `failed` before it exits; a watchdog that sees a neighbour's counter stand still
for `heartbeat_timeout` seconds (killed, out of memory, frozen) writes "rank R stopped responding";
every other watchdog reads the key within a second, prints "rank R failed: ...; stopping rank S too"
and ends its process (exit status 1), wherever its main thread is (typically blocked in a collective
that will never complete). A process that cannot reach the store any more (the rank or agent
hosting it is gone) stops too. Collectives themselves time out after `timeout_minutes` (the process
group's timeout), for hangs the heartbeat cannot see (a live process stuck in a mismatched collective).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

from maskrcnn.errors import UserError

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats and checks
STORE_LOST_AFTER = 10.0  # seconds of failing store requests before the store counts as gone
PEER_EXIT_STATUS = 1  # exit status of a process stopped because another one failed

_state: dict[str, Any] = {"owned": False, "watchdog": None, "generation": 0}


class DistributedError(UserError):
    """The distributed job cannot go on (another rank failed, or the launch is misconfigured)."""


# ---- who am I ------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    """Return the integer environment variable `name` (torchrun sets it), `default` when unset."""
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        raise DistributedError(f"{name}={os.environ[name]!r} is not a number") from None


def env_world_size() -> int:
    """Return WORLD_SIZE from the environment (set by torchrun), 1 when unset."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """Return RANK from the environment (set by torchrun), 0 when unset: usable before the process group exists."""
    return _env_int("RANK", 0)


def is_distributed() -> bool:
    """Return True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Return this process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Return the number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Return True on rank 0, the one process that logs, draws progress bars and writes files."""
    return get_rank() == 0


def local_rank() -> int:
    """Return this process's index on its machine (LOCAL_RANK, set by torchrun; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


# ---- set-up and tear-down ------------------------------------------------------------------------


def setup(device: torch.device, timeout_minutes: float = 30.0, heartbeat_timeout: float = 60.0) -> torch.device:
    """Join the process group the environment describes (if any) and return this process's device.

    CUDA: one GPU per process (cuda:LOCAL_RANK) and the NCCL backend; CPU: gloo. Idempotent: when a
    process group exists already (initialised by the caller) it is used as it is.
    """
    if device.type == "cuda" and (env_world_size() > 1 or is_distributed()):
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={index} but only {torch.cuda.device_count()} GPU(s) are visible; start at most "
                f"{torch.cuda.device_count()} processes per machine (torchrun --nproc-per-node)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if dist.is_initialized() or env_world_size() <= 1:
        return device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE is {env_world_size()} but {', '.join(missing)} is not set; "
                               "start distributed runs with torchrun (see docs/distributed.md)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"rank {os.environ.get('RANK')}: could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(e)}); check that every "
            "machine runs the same torchrun command and can reach the rendezvous address") from None
    _state["owned"] = True
    _state["generation"] += 1
    if get_world_size() > 1:
        _state["watchdog"] = Watchdog(_connect_store(), get_rank(), get_world_size(), heartbeat_timeout,
                                      prefix=_key_prefix())
        _state["watchdog"].start()
    log.debug("rank %d of %d joined (%s, %s)", get_rank(), get_world_size(), backend, device)
    return device


def shutdown() -> None:
    """Leave the process group after a successful run: stop the watchdog, wait for all ranks, destroy."""
    _finish_watchdog()
    if _state["owned"] and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        _state["owned"] = False


@contextmanager
def session(device: torch.device, timeout_minutes: float = 30.0, heartbeat_timeout: float = 60.0) -> Iterator[torch.device]:
    """Run a distributed job's body: set up, yield the device, report a failure to the other ranks, shut down.

    When the body raises, the other ranks learn "rank R: <error>" (and stop, see the module
    docstring) and this process re-raises without waiting for them. When the body fails because a
    collective broke (another process died), this waits for the watchdog to name that process.
    """
    owned_before = _state["owned"] or dist.is_initialized()
    device = setup(device, timeout_minutes, heartbeat_timeout)
    try:
        yield device
    except BaseException as e:
        if is_distributed():
            if getattr(e, "all_ranks", False):
                _finish_watchdog()  # every rank raises this same error at the same point
            else:
                if _is_communication_error(e):
                    _await_verdict(heartbeat_timeout, e)
                report_failure(e)
        raise
    else:
        if not owned_before:
            shutdown()


def on_all_ranks(error: BaseException) -> BaseException:
    """Mark `error` as raised by every rank at the same point (agreed): `session` then reports no failure."""
    error.all_ranks = True  # type: ignore[attr-defined]
    return error


def _finish_watchdog() -> None:
    watchdog = _state["watchdog"]
    if watchdog is not None:
        watchdog.finish()
        _state["watchdog"] = None


def report_failure(error: BaseException) -> None:
    """Tell the other ranks that this one is stopping because of `error` (first failure wins)."""
    watchdog = _state["watchdog"]
    if watchdog is None:
        return
    watchdog.finish(post=False)
    _state["watchdog"] = None
    message = _first_line(error)
    if isinstance(error, KeyboardInterrupt):
        message = f"stopped ({type(error).__name__}: {message})" if message else "interrupted"
    elif not isinstance(error, UserError):
        message = f"{type(error).__name__}: {message}"
    try:
        watchdog.store.compare_set(watchdog.failed_key, "", f"rank {watchdog.rank}: {message}")
    except Exception:  # noqa: BLE001 - the store is gone too; the others' watchdogs notice that
        pass


def _await_verdict(heartbeat_timeout: float, error: BaseException) -> None:
    """Give the watchdog time to name the rank whose death broke a collective (it then ends the process)."""
    watchdog = _state["watchdog"]
    if watchdog is None or not watchdog.is_alive():
        return
    print(f"[rank {get_rank()}] a collective operation failed ({_first_line(error)[:200]}); "
          "waiting for the watchdog to find out which process stopped", file=sys.stderr, flush=True)
    deadline = time.monotonic() + heartbeat_timeout + STORE_LOST_AFTER + 5 * HEARTBEAT_INTERVAL
    while time.monotonic() < deadline and watchdog.is_alive():
        time.sleep(0.2)


def _is_communication_error(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        w in text for w in ("gloo", "nccl", "connection", "connect", "timed out", "socket", "peer"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _connect_store() -> dist.Store:
    """Return a client of the rendezvous TCPStore (torchrun's, or rank 0's) for the watchdog."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=STORE_LOST_AFTER))


def _key_prefix() -> str:
    # torchrun reuses its store when it restarts workers; a set-up per restart and per call keeps keys apart.
    return f"maskrcnn/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_state['generation']}"


# ---- the watchdog --------------------------------------------------------------------------------


class Watchdog(threading.Thread):
    """Heartbeats, a ring of liveness checks and a shared failure key; ends the process on a failure."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, heartbeat_timeout: float,
                 prefix: str = "maskrcnn/watchdog", interval: float = HEARTBEAT_INTERVAL) -> None:
        super().__init__(name="maskrcnn-watchdog", daemon=True)
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.heartbeat_timeout = heartbeat_timeout
        self.interval = interval
        self.prefix = prefix
        self.failed_key = f"{prefix}/failed"
        self.watched = (rank + 1) % world_size
        self._halt = threading.Event()

    def _beat_key(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    def _done_key(self, rank: int) -> str:
        return f"{self.prefix}/done/{rank}"

    def finish(self, post: bool = True) -> None:
        """Stop watching; with `post`, tell the watcher of this rank that it ended normally."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5 * self.interval)
        if post:
            try:
                self.store.set(self._done_key(self.rank), "1")
            except Exception:  # noqa: BLE001
                pass

    def run(self) -> None:
        last_value, last_change = -1, time.monotonic()
        store_ok = time.monotonic()
        while not self._halt.wait(self.interval):
            try:
                self.store.add(self._beat_key(self.rank), 1)
                if self.store.check([self.failed_key]):
                    self._stop_process(self.store.get(self.failed_key).decode(errors="replace"))
                value = self.store.add(self._beat_key(self.watched), 0)
                store_ok = now = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the store (rank 0 or torchrun's agent) is unreachable
                if self._halt.is_set():
                    return
                if time.monotonic() - store_ok > STORE_LOST_AFTER:
                    self._stop_process(
                        f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                        f"is unreachable ({_first_line(e)[:120]}): rank 0 (or the torchrun agent hosting the "
                        "store) has stopped", prefix="")
                continue
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change > self.heartbeat_timeout and not self.store.check([self._done_key(self.watched)]):
                message = (f"rank {self.watched}: stopped responding (no heartbeat for "
                           f"{now - last_change:.0f} s: killed, out of memory, or frozen)")
                try:
                    self.store.compare_set(self.failed_key, "", message)
                    message = self.store.get(self.failed_key).decode(errors="replace")
                except Exception:  # noqa: BLE001
                    pass
                self._stop_process(message)

    def _stop_process(self, failure: str, prefix: str = "") -> None:
        """Print why and end this process now (its main thread may be blocked in a collective)."""
        if self._halt.is_set():
            return  # finished or failing on its own meanwhile: its main thread reports
        # (Our own main thread's failures stop this thread before they are posted, so a message
        # naming this rank means its watcher found it unresponsive: stopping is right then too.)
        who, _, what = failure.partition(": ")
        text = failure if failure.startswith("the rendezvous") else f"{who} failed: {what}"
        print(f"error: [rank {self.rank}] {prefix}{text}; stopping rank {self.rank} too", file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stdout.flush()
        os._exit(PEER_EXIT_STATUS)


# ---- collectives ---------------------------------------------------------------------------------


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it (unchanged when not distributed)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s `obj` on every rank (pickled; keep it small)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Return every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Return every rank's `obj`, in rank order, on rank `dst` (None elsewhere)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out
