"""The queue interface the gateway submits to: Celery on Redis, or an in-process executor.

Both send only the job id (the request is in the job store) to the model's own queue, and both end
in `JobRunner.run_job`, so embedded mode runs the same task and batcher code as a Celery worker.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from hypersd.contracts import JobRecord

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from worker.runner import JobRunner

TASK_NAME = "hypersd.generate"


def queue_name(model: str) -> str:
    """The Celery queue of one model: a worker only takes jobs for the model it holds."""
    return f"hypersd.{model}"


class JobQueue(Protocol):
    def submit(self, record: JobRecord) -> None: ...

    def depth(self, model: str) -> int:
        """Jobs waiting for a task slot."""
        ...


class CeleryQueue:
    """Sends the generate task by name, so the gateway needs neither torch nor the task code."""

    def __init__(self, app: Celery, client: redis.Redis) -> None:
        self.app = app
        self.redis = client

    def submit(self, record: JobRecord) -> None:
        self.app.send_task(TASK_NAME, args=[record.id], queue=queue_name(record.model))

    def depth(self, model: str) -> int:
        # kombu's Redis transport keeps a queue's waiting messages in a list named after it.
        return int(self.redis.llen(queue_name(model)))


class LocalQueue:
    """Embedded mode: `slots` threads calling the runner, as Celery's thread pool does."""

    def __init__(self, runner: JobRunner, slots: int) -> None:
        self.runner = runner
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="task-slot")
        self._waiting = 0
        self._lock = threading.Lock()

    def _run(self, job_id: str) -> None:
        with self._lock:
            self._waiting -= 1
        self.runner.run_job(job_id)

    def submit(self, record: JobRecord) -> None:
        with self._lock:
            self._waiting += 1
        self._executor.submit(self._run, record.id)

    def depth(self, model: str) -> int:
        return self._waiting if model == self.runner.spec.name else 0

    def close(self) -> None:
        """Let submitted jobs finish (SIGTERM drains), then stop the batcher."""
        self._executor.shutdown(wait=True)
        self.runner.close()
