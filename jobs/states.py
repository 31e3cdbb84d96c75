"""The job's state machine: every way a stored job may change, in one place.

::

    queued --start--> running --finish--> succeeded | failed
       |                 |  \\
       |                 |   `--requeue (its worker died)--> queued, or failed after MAX_ATTEMPTS
       |-----cancel------+--> canceled
       `----abandon------+--> failed (its server shuts down; embedded mode, which keeps no queue)
    succeeded --(images past their TTL, when read)--> expired

Each transition is a `Change`: a function of the old record that returns the new one, or None to
leave the job as it is. The job store applies a change atomically (`JobStore.update`), so a cancel,
a finishing worker and a reaper can race without losing or resurrecting a job. Transitions that need
arguments (which worker, which delivery) are made by a function of those arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hypersd.contracts import ErrorDetail, JobStatus
from jobs.record import JobRecord

Change = Callable[[JobRecord], JobRecord | None]

# A job whose worker died this many times while running it fails instead of being re-queued: it is
# probably what kills them.
MAX_ATTEMPTS = 3


def start(worker_id: str, claim: str) -> Change:
    """queued -> running on `worker_id` for the delivery `claim`; anything else stays (canceled
    jobs never run, a second delivery never runs a job again). A job already running under this
    very claim is returned as it is: the claim's write went through but its reply was lost, and
    the worker retried it."""

    def change(record: JobRecord) -> JobRecord | None:
        if record.status == JobStatus.RUNNING and record.claim == claim:
            return record
        if record.status != JobStatus.QUEUED:
            return None
        return record.model_copy(
            update={
                "status": JobStatus.RUNNING,
                "started_at": time.time(),
                "worker": worker_id,
                "claim": claim,
                "attempts": record.attempts + 1,
            }
        )

    return change


def finish(
    worker_id: str,
    status: JobStatus,
    *,
    error: ErrorDetail | None = None,
    timings: dict[str, float] | None = None,
) -> Change:
    """running on `worker_id` -> `status`; a job canceled (or re-queued) meanwhile stays."""

    def change(record: JobRecord) -> JobRecord | None:
        if record.status != JobStatus.RUNNING or record.worker != worker_id:
            return None
        return record.model_copy(
            update={
                "status": status,
                "finished_at": time.time(),
                "error": error,
                "timings": timings or {},
            }
        )

    return change


def cancel(record: JobRecord) -> JobRecord | None:
    """queued or running -> canceled (a running job's result is then discarded); an ended job
    stays."""
    if record.status.terminal:
        return None
    return record.model_copy(update={"status": JobStatus.CANCELED, "finished_at": time.time()})


def requeue(dead_worker: str) -> Change:
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


def abandon(message: str) -> Change:
    """queued or running -> failed with `message` (type `shutdown`); an ended job stays. A worker
    finishing the job later finds it failed and leaves it so (`finish` needs it running)."""

    def change(record: JobRecord) -> JobRecord | None:
        if record.status.terminal:
            return None
        error = ErrorDetail(type="shutdown", message=message)
        return record.model_copy(
            update={"status": JobStatus.FAILED, "finished_at": time.time(), "error": error}
        )

    return change


def public_status(record: JobRecord, ttl_s: int) -> JobStatus:
    """The status a client reads: a succeeded job whose images are past their TTL is expired."""
    expired = record.finished_at is not None and time.time() > record.finished_at + ttl_s
    return JobStatus.EXPIRED if record.status == JobStatus.SUCCEEDED and expired else record.status
