"""Heartbeats (Redis + a file for the liveness probe) and the reaper of jobs whose worker died.

Why a reaper: with `acks_late` on Redis, the message of a job whose worker was killed -9 comes back
only after the broker's visibility timeout, which must exceed the longest job (an hour here). Each
running job names its worker, and each worker's heartbeat key expires a few beats after its last
beat; every worker's reaper puts the running jobs of workers without a heartbeat back to queued and
sends their task again, so a replacement recovers them in seconds. A late redelivery of the old
message is harmless: only a queued job can be started.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from hypersd.contracts import ErrorDetail, JobRecord, JobStatus
from worker.store import JobStore, WorkerInfo

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


def requeue(dead_worker: str) -> Callable[[JobRecord], JobRecord | None]:
    """running on `dead_worker` -> queued (or failed after MAX_ATTEMPTS starts)."""

    def change(record: JobRecord) -> JobRecord | None:
        if record.status != JobStatus.RUNNING or record.worker != dead_worker:
            return None
        if record.attempts >= MAX_ATTEMPTS:
            message = f"the job's worker died {record.attempts} times while running it"
            return record.model_copy(
                update={
                    "status": JobStatus.FAILED,
                    "error": ErrorDetail(type="worker_lost", message=message),
                }
            )
        return record.model_copy(
            update={"status": JobStatus.QUEUED, "started_at": None, "worker": None}
        )

    return change


def reap(store: JobStore, resubmit: Callable[[JobRecord], None]) -> list[str]:
    """Re-queue the running jobs of dead workers; returns their ids."""
    reaped = []
    for job_id in store.running_jobs():
        record = store.get(job_id)
        if record is None or record.worker is None or store.worker_alive(record.worker):
            continue
        new = store.update(job_id, requeue(record.worker))
        if new is not None and new.status == JobStatus.QUEUED:
            log.warning("job %s lost its worker %s: re-queued", job_id, record.worker)
            resubmit(new)
            reaped.append(job_id)
    return reaped


class Heartbeat:
    """A thread that beats every `interval_s` and, when given `resubmit`, reaps.

    A heartbeat lives for three intervals, so one slow beat does not declare a worker dead.
    """

    def __init__(
        self,
        store: JobStore,
        info: Callable[[], WorkerInfo],
        *,
        interval_s: float,
        file: Path | None = None,
        resubmit: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.store = store
        self.info = info
        self.interval_s = interval_s
        self.file = file
        self.resubmit = resubmit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def beat(self) -> None:
        info = self.info()
        self.store.beat(info, ttl=3 * self.interval_s)
        if self.file is not None:
            self.file.write_text(info.model_dump_json())

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
                if self.resubmit is not None:
                    reap(self.store, self.resubmit)
            except Exception:  # a Redis hiccup must not end the heartbeat thread
                log.exception("heartbeat failed")

    def stop(self) -> None:
        """Stop beating and withdraw this worker, so readiness drops at once."""
        self._stop.set()
        self._thread.join()
        self.store.forget_worker(self.info().id)
