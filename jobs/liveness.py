"""Worker liveness: heartbeats (Redis + a file for the probe) and the reaper of dead workers' jobs.

Why a reaper: with `acks_late` on Redis, the message of a job whose worker was killed -9 comes back
only after the broker's visibility timeout, which must exceed the longest job (an hour here). Each
running job names its worker, and each worker's heartbeat key expires a few beats after its last
beat; every worker's reaper puts the running jobs of workers without a heartbeat back to queued and
sends their task again, so a replacement recovers them in seconds. A late redelivery of the old
message is harmless: only a queued job can be started.

A worker can also die after taking a job's message and before marking the job running; that job
names no worker, so the reaper finds it from the other side: a message taken a heartbeat lifetime
ago (a live worker marks its job running within milliseconds) whose job is still queued goes back
to the head of its queue. And a message can be lost outright (between Redis handing it out and
kombu recording it unacked, around a Redis restart): a job queued a heartbeat lifetime ago with no
message anywhere is published again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from hypersd.contracts import JobStatus
from jobs.queue import CeleryQueue
from jobs.record import JobRecord
from jobs.states import requeue
from jobs.store import JobStore, WorkerInfo

log = logging.getLogger(__name__)


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


def give_back_unstarted(store: JobStore, queue: CeleryQueue, grace_s: float) -> list[str]:
    """Return to the queue the messages taken `grace_s` ago or more whose job is still queued.

    A live worker that is merely slow to mark its job running loses nothing: the given-back message
    is skipped by whoever takes it, since only a queued job starts.
    """
    given_back = []
    for delivery in queue.taken_before(grace_s):
        record = store.get(delivery.job_id)
        if record is None or record.status != JobStatus.QUEUED:
            continue  # running (the lease covers it), or finished and acked soon
        if queue.give_back(delivery, record.model):
            log.warning("job %s was taken but never started: given back", delivery.job_id)
            given_back.append(delivery.job_id)
    return given_back


def republish_lost(store: JobStore, queue: CeleryQueue, after_s: float) -> list[str]:
    """Publish again the jobs queued `after_s` ago or more whose message is gone.

    The job store is the source of truth: a message can be lost between Redis handing it to a
    worker and kombu recording it as unacked (seen around a Redis restart), and then nothing
    would ever run a job answered 202. A job with a message (waiting, or taken and not acked) is
    left alone; a second message for a job that had one after all is harmless, since only a
    queued job starts.
    """
    republished = []
    present: dict[str, set[str]] = {}  # model -> jobs with a message, read once per model
    for job_id in store.queued_before(after_s):
        record = store.get(job_id)
        if record is None or record.status != JobStatus.QUEUED:
            continue
        if record.model not in present:
            present[record.model] = queue.message_job_ids(record.model)
        if job_id not in present[record.model]:
            log.warning("job %s has been queued with no message: published again", job_id)
            queue.submit(record)
            present[record.model].add(job_id)
            republished.append(job_id)
    return republished


class Heartbeat:
    """A thread that beats every `interval_s` and, when given the Celery `queue`, reaps.

    A heartbeat lives for three intervals, so one slow beat does not declare a worker dead; a
    message is given back after as long.
    """

    def __init__(
        self,
        store: JobStore,
        info: Callable[[], WorkerInfo],
        *,
        interval_s: float,
        file: Path | None = None,
        queue: CeleryQueue | None = None,
    ) -> None:
        self.store = store
        self.info = info
        self.interval_s = interval_s
        self.file = file
        self.queue = queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    @property
    def lifetime_s(self) -> float:
        return 3 * self.interval_s

    def beat(self) -> None:
        info = self.info()
        self.store.beat(info, ttl=self.lifetime_s)
        if self.file is not None:
            self.file.write_text(info.model_dump_json())

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
                if self.queue is not None:
                    reap(self.store, self.queue.submit)
                    give_back_unstarted(self.store, self.queue, self.lifetime_s)
                    republish_lost(self.store, self.queue, self.lifetime_s)
            except Exception:  # a Redis hiccup must not end the heartbeat thread
                log.exception("heartbeat failed")

    def stop(self) -> None:
        """Stop beating and withdraw this worker, so readiness drops at once."""
        self._stop.set()
        self._thread.join()
        self.store.forget_worker(self.info().id)
