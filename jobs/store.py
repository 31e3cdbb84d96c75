"""Job state, images and worker heartbeats: the store's interface and what both stores share.

The stores: `jobs.redis_store.RedisJobStore` and, for embedded mode,
`jobs.memory_store.MemoryJobStore`.

Both the gateway and the workers read and write jobs here, so the gateway answers status requests
without asking a worker. Every state change is an atomic read-modify-write (`update`) applying one
of `jobs.states`' transitions, so a cancel, a finishing worker and a reaper can race without losing
or resurrecting a job. Keys expire after the job TTL.

A request that waits for its job (`Prefer: wait=N`, the synchronous OpenAI route) is woken when the
job ends instead of polling: in Redis the change that ends a job also publishes the ended record on
one channel, which a gateway thread turns into wake-ups carrying it (so the waiter answers without
reading the job again); in memory the update itself wakes the waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import redis
from pydantic import BaseModel

from jobs.record import JobRecord
from jobs.states import Change

log = logging.getLogger(__name__)

# What a store call raises while Redis is down or restarting (LOADING is a ConnectionError too):
# the gateway answers 503 and a worker holds a finished job's result until Redis is back.
STORE_DOWN = (redis.ConnectionError, redis.TimeoutError)


class IdempotencyConflict(Exception):
    """An `Idempotency-Key` was reused with another request body."""


class Watch:
    """One waiter's view of a job: `ended` is set when the job may have ended, and `record` is the
    job as it ended when the notice carried it (a hint like the event: None means re-read)."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.record: JobRecord | None = None

    def notify(self, record: JobRecord | None) -> None:
        """Wake the waiter; called on its event loop.

        Args:
            record: The job as it ended, when the notice carried it; None: the waiter re-reads.
        """
        if record is not None:
            self.record = record
        self.ended.set()


class FinishWaiters:
    """Asyncio waiters on jobs, woken from any thread when a job may have ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, Watch]]] = {}

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """A `Watch` of `job_id`, for the current event loop."""
        entry = (asyncio.get_running_loop(), Watch())
        with self._lock:
            self._waiters.setdefault(job_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                entries = self._waiters[job_id]
                entries.remove(entry)
                if not entries:
                    del self._waiters[job_id]

    def wake(self, job_id: str | None = None, record: JobRecord | None = None) -> None:
        """Wake the waiters of `job_id`, or all of them (after notices may have been missed).

        Args:
            job_id: The job that ended; None: every waiter, each to re-read its job.
            record: The job as it ended, handed to its waiters; None: they re-read it.
        """
        with self._lock:
            if job_id is None:
                entries = [entry for group in self._waiters.values() for entry in group]
            else:
                entries = list(self._waiters.get(job_id, ()))
        for loop, watch in entries:
            # The loop may be closing at shutdown; its waiters are gone then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(watch.notify, record)


class WorkerInfo(BaseModel):
    """One worker's heartbeat."""

    id: str
    model: str
    backend: str
    capacity: int
    busy: int
    last_beat: float


class JobStore(Protocol):
    """Where jobs, their images and worker heartbeats live."""

    def create(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> JobRecord:
        """Store a new job, or return the job already made under the same idempotency key.

        Args:
            idempotency: (key, request fingerprint).

        Raises:
            IdempotencyConflict: the key is known with another fingerprint.
        """
        ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def idempotent_job(self, key: str) -> str | None:
        """The id of the job made under idempotency `key`, if any (a retry, not a new job)."""
        ...

    def list_jobs(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        """`owner`'s jobs, newest first: up to `limit` of them after the job `after` (a cursor
        that stays right while new jobs come), and whether there are more.

        Raises:
            KeyError: `after` is not one of `owner`'s jobs (or has expired).
        """
        ...

    def update(
        self,
        job_id: str,
        change: Change,
        *,
        images: Sequence[bytes] = (),
        known: JobRecord | None = None,
    ) -> JobRecord | None:
        """Apply `change` atomically; it returns the new record, or None to leave it as is.

        Args:
            job_id: The job.
            change: The transition (`jobs.states`).
            images: The job's images, stored (with the job TTL) in the same atomic write as the
                change and only if it applies: a finished job never lacks its images, and a job
                canceled meanwhile gets none.
            known: The record as the caller last wrote or read it. While it is still the stored
                one, the change needs no read first (a round trip less); otherwise the store
                reads the job and applies `change` to that.

        Returns the new record when it changed, else None.
        """
        ...

    def watch(self, job_id: str) -> AbstractContextManager[Watch]:
        """A `Watch` (of the running loop) woken when the job may have ended.

        A hint, not a guarantee: re-read the job when woken without a record, and now and then
        anyway, since a notice can be missed (e.g. while the store reconnects).
        """
        ...

    def get_image(self, job_id: str, index: int) -> bytes | None: ...

    def running_jobs(self) -> list[str]:
        """Ids of jobs that a worker has started (for the reaper)."""
        ...

    def queued_before(self, seconds_ago: float) -> list[str]:
        """Ids of jobs queued (created, or re-queued) at least `seconds_ago` (for the reaper)."""
        ...

    def finished_counts(self) -> dict[tuple[str, str], int]:
        """Finished jobs by (model, status), for the gateway's metrics."""
        ...

    def beat(self, info: WorkerInfo, ttl: float) -> None:
        """Record a worker's heartbeat; it counts as alive for `ttl` seconds."""
        ...

    def forget_worker(self, worker_id: str) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    def worker_alive(self, worker_id: str) -> bool: ...

    def ping(self) -> bool: ...

    def jobs_in_flight(self, owner: str) -> int:
        """How many of `owner`'s jobs are queued or running."""
        ...

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        """Take a token from a token bucket (`burst` tokens, refilled at `rate_per_s`).

        Returns 0 when one was taken, else the seconds until one will be there.
        """
        ...

    def set_progress(self, job_id: str, step: int) -> None:
        """Record that a running job has done `step` denoising steps."""
        ...

    def progress(self, job_id: str) -> int | None:
        """The denoising steps a running job has done, if it reported any."""
        ...

    def queue_position(self, record: JobRecord) -> int | None:
        """How many jobs for the model of the queued job `record` are ahead of it."""
        ...

    def take_webhooks(self, lease_s: float, limit: int) -> list[tuple[str, int]]:
        """Take up to `limit` due webhooks, each leased for `lease_s` (a deliverer that dies
        leaves it due again then); returns (job id, attempt number from 1)."""
        ...

    def webhook_later(self, job_id: str, at: float) -> None:
        """Make a taken webhook due again at Unix time `at` (a retry)."""
        ...

    def webhook_done(self, job_id: str) -> None:
        """Drop a webhook: delivered, or out of attempts."""
        ...
