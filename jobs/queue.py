"""The queue the gateway submits jobs to, and the Celery app gateway and workers configure alike.

A queue sends only the job id (the request is in the job store) to the model's own queue. In
production that is Celery on Redis (`CeleryQueue`); embedded mode puts an in-process executor behind
the same `JobQueue` interface (`launcher.embedded`), so it runs the same task and batcher code.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Protocol

import redis
from celery import Celery

from jobs.record import JobRecord
from jobs.settings import Settings

TASK_NAME = "hypersd.generate"

# kombu's Redis transport keeps each message a consumer took until it is acked: the message in a
# hash by delivery tag, the time it was taken in a sorted set.
_UNACKED = "unacked"
_UNACKED_INDEX = "unacked_index"


def queue_name(model: str) -> str:
    """The Celery queue of one model: a worker only takes jobs for the model it holds."""
    return f"hypersd.{model}"


def create_celery(settings: Settings) -> Celery:
    """The Celery app on the Redis broker, as the gateway and the workers both configure it.

    Celery's thread pool (what workers run) does not enforce the time limits (only prefork does);
    they are set for the record, and the worker enforces `job_timeout_s` itself.
    """
    if settings.visibility_timeout_s <= settings.job_timeout_s + 30:
        raise ValueError("visibility_timeout_s must exceed job_timeout_s + 30 (the hard limit)")
    app = Celery("hypersd", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the job store
        task_acks_late=True,  # a job is acked when done, so a lost worker's job comes back
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker reserves no more jobs than it has slots
        task_soft_time_limit=settings.job_timeout_s,
        task_time_limit=settings.job_timeout_s + 30,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


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

    def message_job_ids(self, model: str) -> set[str]:
        """The jobs that have a message: waiting in `model`'s queue, or taken and not acked."""
        raws = [*self.redis.lrange(queue_name(model), 0, -1), *self.redis.hvals(_UNACKED)]
        ids = set()
        for raw in raws:
            payload = json.loads(raw)
            payload = payload[0] if isinstance(payload, list) else payload  # unacked: [msg, ...]
            if payload.get("headers", {}).get("task") == TASK_NAME:
                ids.add(json.loads(base64.b64decode(payload["body"]))[0][0])
        return ids

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
