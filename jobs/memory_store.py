"""The in-memory job store of embedded mode (one process; images in a local folder)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from hypersd.contracts import JobStatus
from jobs.record import JobRecord
from jobs.states import Change
from jobs.store import FinishWaiters, IdempotencyConflict, Watch, WorkerInfo


class MemoryJobStore:
    """Embedded mode: jobs in a dict (one process), images in a local folder."""

    def __init__(self, images_dir: Path, ttl_s: int) -> None:
        self.images_dir = images_dir
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
        self._idempotency: dict[str, tuple[str, str]] = {}
        self._finished: Counter[tuple[str, str]] = Counter()
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._waiters = FinishWaiters()
        self._buckets: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, at)
        self._progress: dict[str, int] = {}
        self._webhooks: dict[str, tuple[float, int]] = {}  # job -> (due at, attempts)

    def _expire(self) -> None:
        """Drop jobs older than twice the TTL, as Redis does (called under the lock)."""
        cutoff = time.time() - 2 * self.ttl_s
        for job_id in [j for j, record in self._jobs.items() if record.created_at < cutoff]:
            del self._jobs[job_id]
            for path in self.images_dir.glob(f"{job_id}-*"):
                path.unlink(missing_ok=True)

    def create(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> JobRecord:
        with self._lock:
            self._expire()
            if idempotency is not None:
                key, fingerprint = idempotency
                known = self._idempotency.get(key)
                if known is not None and known[1] in self._jobs:
                    if known[0] != fingerprint:
                        raise IdempotencyConflict(key)
                    return self._jobs[known[1]]
                self._idempotency[key] = (fingerprint, record.id)
            self._jobs[record.id] = record
            return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    def idempotent_job(self, key: str) -> str | None:
        with self._lock:
            known = self._idempotency.get(key)
            return None if known is None else known[1]

    def list_jobs(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        with self._lock:
            self._expire()
            owned = sorted(
                (record for record in self._jobs.values() if record.owner == owner),
                key=lambda record: record.created_at,
                reverse=True,
            )
        ids = [record.id for record in owned]
        if after is not None and after not in ids:
            raise KeyError(after)
        start = 0 if after is None else ids.index(after) + 1
        return owned[start : start + limit], len(owned) > start + limit

    def update(
        self,
        job_id: str,
        change: Change,
        *,
        images: Sequence[bytes] = (),
        known: JobRecord | None = None,  # reading a dict costs nothing: the job is always read
    ) -> JobRecord | None:
        with self._lock:
            record = self._jobs.get(job_id)
            new = None if record is None else change(record)
            if new is not None:
                # under the lock, so no reader sees the job ended without its images
                for index, data in enumerate(images):
                    (self.images_dir / f"{job_id}-{index}").write_bytes(data)
                self._jobs[job_id] = new
                if new.status.terminal:
                    self._finished[(new.model, new.status.value)] += 1
                    self._progress.pop(job_id, None)
                    if new.webhook is not None:
                        self._webhooks.setdefault(job_id, (time.time(), 0))
        if new is not None and new.status.terminal:
            self._waiters.wake(job_id, new)
        return new

    def watch(self, job_id: str) -> AbstractContextManager[Watch]:
        return self._waiters.watch(job_id)

    def get_image(self, job_id: str, index: int) -> bytes | None:
        if self.get(job_id) is None:
            return None
        path = self.images_dir / f"{job_id}-{index}"
        return path.read_bytes() if path.is_file() else None

    def running_jobs(self) -> list[str]:
        with self._lock:
            return [j for j, record in self._jobs.items() if record.status == JobStatus.RUNNING]

    def queued_before(self, seconds_ago: float) -> list[str]:
        # in memory, only `created_at`: embedded mode's queue is in-process and loses nothing
        cutoff = time.time() - seconds_ago
        with self._lock:
            return [
                job_id
                for job_id, record in self._jobs.items()
                if record.status == JobStatus.QUEUED and record.created_at <= cutoff
            ]

    def finished_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._finished)

    def beat(self, info: WorkerInfo, ttl: float) -> None:
        with self._lock:
            self._workers[info.id] = (info, time.time() + ttl)

    def forget_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    def workers(self) -> list[WorkerInfo]:
        now = time.time()
        with self._lock:
            return [info for info, until in self._workers.values() if until > now]

    def worker_alive(self, worker_id: str) -> bool:
        return any(info.id == worker_id for info in self.workers())

    def ping(self) -> bool:
        return True

    def jobs_in_flight(self, owner: str) -> int:
        with self._lock:
            return sum(
                1
                for record in self._jobs.values()
                if record.owner == owner and not record.status.terminal
            )

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(bucket, (float(burst), now))
            tokens = min(burst, tokens + (now - at) * rate_per_s)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / rate_per_s
            self._buckets[bucket] = (tokens, now)
            return wait

    def set_progress(self, job_id: str, step: int) -> None:
        with self._lock:
            self._progress[job_id] = step

    def progress(self, job_id: str) -> int | None:
        with self._lock:
            return self._progress.get(job_id)

    def queue_position(self, record: JobRecord) -> int | None:
        with self._lock:
            if record.status != JobStatus.QUEUED:
                return None
            return sum(
                1
                for other in self._jobs.values()
                if other.model == record.model
                and other.status == JobStatus.QUEUED
                and other.created_at < record.created_at
            )

    def take_webhooks(self, lease_s: float, limit: int) -> list[tuple[str, int]]:
        now = time.time()
        with self._lock:
            due = [job_id for job_id, (at, _) in self._webhooks.items() if at <= now][:limit]
            for job_id in due:
                self._webhooks[job_id] = (now + lease_s, self._webhooks[job_id][1] + 1)
            return [(job_id, self._webhooks[job_id][1]) for job_id in due]

    def webhook_later(self, job_id: str, at: float) -> None:
        with self._lock:
            if job_id in self._webhooks:
                self._webhooks[job_id] = (at, self._webhooks[job_id][1])

    def webhook_done(self, job_id: str) -> None:
        with self._lock:
            self._webhooks.pop(job_id, None)
