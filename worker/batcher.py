"""The in-process micro-batcher: compatible jobs from several task slots run as one pipeline call.

Task threads (Celery's thread pool, or embedded mode's executor) each hand one job's images to
`MicroBatcher.submit` and wait on the returned future. One batcher thread owns the pipeline: it
takes the oldest waiting job, gathers compatible ones (same `BatchKey`) until `max_batch_size`
images or `max_wait_ms` after the first one, runs them as one call and splits the result back.
It waits for company only while other jobs are in flight (held by other task slots): a lone job,
as at concurrency 1, starts at once instead of paying `max_wait_ms` for company that never comes.
This is why no `celery-batches` (whose large prefetch conflicts with prefetch 1) is needed, and
why the pipeline never runs in two threads at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Request = TypeVar("Request")
Output = TypeVar("Output")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """What jobs must share to run in one pipeline call."""

    model: str
    steps: int
    width: int
    height: int
    guidance_scale: float
    eta: float | None


@dataclass
class _Item(Generic[Request, Output]):
    key: BatchKey
    requests: list[Request]
    future: Future[list[Output]] = field(default_factory=Future)


RunBatch = Callable[[BatchKey, list[Request]], Sequence[Output]]


class MicroBatcher(Generic[Request, Output]):
    """Groups submitted requests into batched calls of `run`.

    Args:
        run: Runs one batch (all with the same key) and returns one output per request, in order.
        max_batch_size: Most requests (images) per call; 1 turns batching off. A job with more
            images than this still runs, alone.
        max_wait_ms: How long the first job of a batch waits for company. Jobs that arrive while
            a batch runs need no wait: they are already there when the next batch forms.
        on_batch: Called after every batch that ran with its key, its size (images) and its
            duration in seconds (for metrics and the service-time estimates).
        in_flight: How many jobs the task slots hold now (taken, not finished), the ones already
            submitted included. A batch waits for company only while some of them are outside
            it: under load, the jobs other slots are finishing or about to submit. None: always
            wait.
    """

    def __init__(
        self,
        run: RunBatch[Request, Output],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[BatchKey, int, float], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self._run = run
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self._on_batch = on_batch
        self._in_flight = in_flight
        self._queue: queue.Queue[_Item[Request, Output] | None] = queue.Queue()
        self._waiting: list[_Item[Request, Output]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: BatchKey, requests: Sequence[Request]) -> Future[list[Output]]:
        """Queue one job's requests; the future gives their outputs, in order."""
        item: _Item[Request, Output] = _Item(key, list(requests))
        self._queue.put(item)
        return item.future

    def stop(self) -> None:
        """Run what was submitted, then end the batcher thread."""
        self._queue.put(None)
        self._thread.join()

    def _take(self, timeout: float | None) -> bool:
        """Move one item from the queue to `_waiting`; False on timeout or stop."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        if item is None:
            self._stopping = True
            return False
        self._waiting.append(item)
        return True

    def _loop(self) -> None:
        while True:
            while not self._queue.empty() and self._take(None):
                pass
            if not self._waiting:
                if self._stopping:
                    return
                self._take(None)
                continue
            self._run_group(self._gather())

    def _company_possible(self, group: list[_Item[Request, Output]]) -> bool:
        """Whether a job outside `group` and `_waiting` is in flight (so worth waiting for)."""
        if self._in_flight is None:
            return True
        return self._in_flight() > len(group) + len(self._waiting)

    def _gather(self) -> list[_Item[Request, Output]]:
        """The oldest waiting item plus compatible ones, waiting up to max_wait for more."""
        first = self._waiting[0]
        group: list[_Item[Request, Output]] = []
        size = 0
        for item in list(self._waiting):
            if item.key == first.key and (
                not group or size + len(item.requests) <= self.max_batch_size
            ):
                group.append(item)
                size += len(item.requests)
                self._waiting.remove(item)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size and not self._stopping and self._company_possible(group):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._take(remaining):
                break
            item = self._waiting[-1]
            if item.key == first.key and size + len(item.requests) <= self.max_batch_size:
                group.append(self._waiting.pop())
                size += len(item.requests)
        return group

    def _run_group(self, group: list[_Item[Request, Output]]) -> None:
        requests = [request for item in group for request in item.requests]
        started = time.perf_counter()
        try:
            outputs = list(self._run(group[0].key, requests))
        except Exception as error:
            for item in group:
                item.future.set_exception(error)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(group[0].key, len(requests), time.perf_counter() - started)
            except Exception:  # a report that failed (Redis down) must not lose the images
                log.exception("reporting a batch of %s failed", group[0].key.model)
        start = 0
        for item in group:
            item.future.set_result(outputs[start : start + len(item.requests)])
            start += len(item.requests)
