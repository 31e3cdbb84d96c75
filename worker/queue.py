"""The queue interface the gateway submits to: Celery on Redis, or an in-process executor.

Both send only the job id (the request is in the job store) to the model's own queue, and both end
in `JobRunner.run_job`, so embedded mode runs the same task and batcher code as a Celery worker.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hypersd.contracts import JobRecord

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from worker.runner import JobRunner

TASK_NAME = "hypersd.generate"

# kombu's Redis transport keeps each message a consumer took until it is acked: the message in a
# hash by delivery tag, the time it was taken in a sorted set.
_UNACKED = "unacked"
_UNACKED_INDEX = "unacked_index"


def queue_name(model: str) -> str:
    """The Celery queue of one model: a worker only takes jobs for the model it holds."""
    return f"hypersd.{model}"


class JobQueue(Protocol):
    def submit(self, record: JobRecord) -> None: ...

    def depth(self, model: str) -> int:
        """Jobs waiting for a task slot."""
        ...


@dataclass(frozen=True)
class Delivery:
    """A message a worker took and has not acked: its kombu delivery tag and job id."""

    tag: str
    job_id: str


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

    def taken_before(self, seconds_ago: float) -> list[Delivery]:
        """Messages of generate tasks taken by a worker at least `seconds_ago` and not acked."""
        index = self.redis.zrangebyscore(_UNACKED_INDEX, 0, time.time() - seconds_ago)
        tags = [tag.decode() for tag in index if isinstance(tag, bytes)]
        deliveries = []
        for tag, raw in zip(tags, self.redis.hmget(_UNACKED, tags) if tags else [], strict=True):
            if raw is None:  # acked since the index was read
                continue
            payload = json.loads(raw)[0]
            if payload.get("headers", {}).get("task") != TASK_NAME:
                continue
            # Celery's message protocol 2: the body is [args, kwargs, embed], base64 on Redis.
            args = json.loads(base64.b64decode(payload["body"]))[0]
            deliveries.append(Delivery(tag, args[0]))
        return deliveries

    def give_back(self, delivery: Delivery, model: str) -> bool:
        """Put a taken message back at the head of its queue, as kombu does once the visibility
        timeout has passed; False if it was acked or given back meanwhile (by another reaper).
        """
        moved: list[bool] = []

        def move(pipe: redis.client.Pipeline) -> None:
            moved.clear()
            raw = pipe.hget(_UNACKED, delivery.tag)
            pipe.multi()
            pipe.zrem(_UNACKED_INDEX, delivery.tag)
            pipe.hdel(_UNACKED, delivery.tag)
            if raw is not None:
                # Workers pop the right end (BRPOP) of the list that publishers LPUSH to.
                pipe.rpush(queue_name(model), json.dumps(json.loads(raw)[0]))
                moved.append(True)

        self.redis.transaction(move, _UNACKED)
        return bool(moved)


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
