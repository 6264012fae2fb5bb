"""The scheduler between HTTP and the model: a bounded queue, per-request deadlines, dynamic batching.

Requests are admitted once their image is decoded (`submit`), into a queue bounded by count and by the
decoded images' bytes; a full queue raises `QueueFull` (the service answers 503 with its `retry_after`).
`workers` batches run at once, each in a worker thread: a worker takes the oldest request and, up to
`max_batch`, the requests that arrive before the oldest has waited `max_delay` seconds (Triton's and
TorchServe's dynamic batching), and gives their images to `run_batch` together. A request whose deadline
passes or whose client leaves before it runs is taken out of the queue (`withdraw`) and counted; one that
is running when that happens finishes, and its result is dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from maskrcnn.serve.metrics import ServeMetrics


@dataclass(eq=False)
class Job:
    """One image waiting for the model, with its deadline (time.monotonic() seconds) and its result."""

    image: np.ndarray
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its batch went to the model
    batch: int = 0  # the size of that batch
    future: asyncio.Future[Any] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes)


class QueueFull(Exception):
    """The queue holds `max_queue` requests or `max_queue_bytes` of images; retry after `retry_after` s."""

    def __init__(self, reason: str, retry_after: int):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class Dropped(Exception):
    """The request was taken out of the queue before it ran: its deadline passed or its client left."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Scheduler:
    """Runs queued images through `run_batch` (a list of HxWx3 arrays → one output per image) in batches."""

    def __init__(self, run_batch: Callable[[list[np.ndarray]], list[Any]], metrics: ServeMetrics, *,
                 max_batch: int = 1, max_delay: float = 0.0, workers: int = 1, max_queue: int = 8,
                 max_queue_bytes: int = 256 * 2**20):
        self.run_batch, self.metrics = run_batch, metrics
        self.max_batch, self.max_delay, self.workers = max_batch, max_delay, workers
        self.max_queue, self.max_queue_bytes = max_queue, max_queue_bytes
        self.queue: deque[Job] = deque()
        self.queued_bytes = 0
        self.running = 0
        self.seconds_per_image = 1.0  # a running average, for Retry-After
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None

    # -- life ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (call from the event loop that will submit)."""
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="maskrcnn-model")
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """Stop taking batches; batches already in the model finish in their threads."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in list(self.queue):
            self.withdraw(job, "shutdown")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_now(self, images: list[np.ndarray]) -> list[Any]:
        """Run `images` as one batch in a model thread, outside the queue (the warm-up)."""
        assert self._executor is not None, "start() the scheduler first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, images)

    # -- admission ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull. An image larger than the byte limit is admitted to an empty queue."""
        if len(self.queue) >= self.max_queue:
            self._reject("queue_count")
        if self.queue and self.queued_bytes + job.nbytes > self.max_queue_bytes:
            self._reject("queue_bytes")
        job.future = asyncio.get_running_loop().create_future()
        self.queue.append(job)
        self.queued_bytes += job.nbytes
        self._gauges()
        self._arrived.set()

    def _reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        raise QueueFull(reason, self.retry_after())

    def retry_after(self) -> int:
        """Return seconds until the queue has likely moved on: its images at the measured rate, 1 to 60."""
        waiting = len(self.queue) + self.running
        return max(1, min(60, math.ceil(waiting * self.seconds_per_image / self.workers)))

    async def result(self, job: Job) -> Any:
        """Return the job's output; raise Dropped if it was withdrawn, or when its deadline passes first."""
        assert job.future is not None, "submit the job first"
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            if not self.withdraw(job, "deadline"):  # running: it finishes, its result is dropped
                self.metrics.expired_running.inc()
            raise Dropped("deadline") from None

    def withdraw(self, job: Job, reason: str) -> bool:
        """Take a queued job out (counted as dropped for `reason`); return False if it is not queued."""
        try:
            self.queue.remove(job)
        except ValueError:
            return False
        self.queued_bytes -= job.nbytes
        self._gauges()
        self.metrics.dropped.labels(reason).inc()
        if job.future is not None and not job.future.done():
            job.future.set_exception(Dropped(reason))
        return True

    # -- the workers --------------------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A job whose handler stopped waiting while the batch gathered (deadline, client gone) does not run.
            batch = [job for job in await self._next_batch() if job.future is not None and not job.future.done()]
            if not batch:
                continue
            start = time.monotonic()
            for job in batch:
                job.started, job.batch = start, len(batch)
                self.metrics.queue_wait.observe(start - job.enqueued)
            self.running += len(batch)
            self._gauges()
            try:
                outputs = await loop.run_in_executor(self._executor, self.run_batch, [j.image for j in batch])
            except Exception as e:  # the handlers answer 500 with its message; the worker goes on
                for job in batch:
                    _settle(job, error=e)
            else:
                for job, output in zip(batch, outputs):
                    _settle(job, output=output)
                seconds = time.monotonic() - start
                self.metrics.inference.observe(seconds)
                self.metrics.batch_size.observe(len(batch))
                self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / len(batch)
            finally:
                self.running -= len(batch)
                self._gauges()

    async def _next_batch(self) -> list[Job]:
        """Wait for a job; then take more, up to max_batch, until the first has waited max_delay."""
        batch = [await self._take(None)]
        until = batch[0].enqueued + self.max_delay
        while len(batch) < self.max_batch:
            job = await self._take(until)
            if job is None:
                break
            batch.append(job)
        return batch

    async def _take(self, until: float | None) -> Job | None:
        """Return the oldest live job, waiting until `until` (time.monotonic(); None: for ever) for one to
        arrive; the queued jobs whose deadline has passed are dropped on the way."""
        while True:
            while self.queue:
                job = self.queue[0]
                if job.deadline > time.monotonic():
                    self.queue.popleft()
                    self.queued_bytes -= job.nbytes
                    self._gauges()
                    return job
                self.withdraw(job, "deadline")
            timeout = None if until is None else until - time.monotonic()
            if timeout is not None and timeout <= 0:
                return None
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return None

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.queue_bytes.set(self.queued_bytes)
        self.metrics.running.set(self.running)


def _settle(job: Job, output: Any = None, error: BaseException | None = None) -> None:
    """Give a job its output or error, unless its handler has stopped waiting."""
    if job.future is None or job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(output)
