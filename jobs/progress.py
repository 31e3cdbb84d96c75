"""Step progress of running jobs: what a worker's pipeline call reports, throttled, to the store.

The gateway shows it as the job's `step` and streams it on `GET /v1/generations/{id}/events`.
A batch runs several jobs in one pipeline call, so one step is every job's step. Progress is a
hint: a write that fails (Redis restarting) is skipped, never holding the batch up. A 1-step batch
writes none: its one step is the whole denoising, after which the job ends a decode later, so the
write would tell a client nothing that "running" does not, and it would cost the job a round trip.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from jobs.store import STORE_DOWN, JobStore

log = logging.getLogger(__name__)

# At most this many writes per second per batch: a 1-step model on a GPU ends steps every few ms.
WRITES_PER_S = 4.0


class StepReporter:
    """Called with each finished step (from 1) of one pipeline call running `job_ids`.

    Args:
        store: The job store.
        job_ids: The jobs of the batch.
        total: The batch's steps; the last one is always written (unless it is the only one).
        min_interval_s: The least time between two writes.
    """

    def __init__(
        self,
        store: JobStore,
        job_ids: Sequence[str],
        total: int,
        min_interval_s: float = 1 / WRITES_PER_S,
    ) -> None:
        self.store = store
        self.job_ids = list(dict.fromkeys(job_ids))  # a job's images are several requests
        self.total = total
        self.min_interval_s = min_interval_s
        self.writes = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, step: int) -> None:
        if self.total == 1:
            return
        now = time.monotonic()
        with self._lock:
            if step < self.total and now - self._last < self.min_interval_s:
                return
            self._last = now
            self.writes += 1
        try:
            for job_id in self.job_ids:
                self.store.set_progress(job_id, step)
        except STORE_DOWN as error:
            log.warning("progress not recorded (%s)", error)
