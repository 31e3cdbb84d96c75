"""A job stored but not published (the broker failed in between) is not lost to its retry.

The gateway stores a job, then publishes its message. If the publish fails, the client gets a
503 and retries with its Idempotency-Key; the retry finds the stored job, and must publish it
again, or no worker would ever see it. Real Redis (a database of its own, which no worker reads,
so the messages can be counted), the real job store and the real Celery queue; the one failed
publish is injected.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from kombu.exceptions import OperationalError
from serving_fixtures import MODEL, SHIPPED_REGISTRY

from hypersd.contracts import GenerateRequest, JobRecord, JobStatus
from hypersd.registry import load_registry
from service import jobs
from service.settings import Settings
from worker.celery_app import create_celery
from worker.queue import CeleryQueue
from worker.runner import start
from worker.store import RedisJobStore

PROMPT = "a large red circle in the center on a white background"


class BrokerFailsOnce(CeleryQueue):
    """The real queue, whose first publish fails as a dropped broker connection does."""

    failed = False

    def submit(self, record: JobRecord) -> None:
        if not self.failed:
            self.failed = True
            raise OperationalError("connection to the broker lost")
        super().submit(record)


@pytest.fixture
def parts(redis_url: str) -> Iterator[tuple[RedisJobStore, BrokerFailsOnce]]:
    url = f"{redis_url}/4"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RedisJobStore(client, ttl_s=60)
    queue = BrokerFailsOnce(create_celery(Settings(redis_url=url)), client)
    yield store, queue
    store.close()
    client.flushdb()
    client.close()


def test_a_retry_publishes_a_job_whose_publish_failed(
    parts: tuple[RedisJobStore, BrokerFailsOnce],
) -> None:
    store, queue = parts
    body = GenerateRequest(prompt=PROMPT, model=MODEL, steps=1)
    submit = {
        "registry": load_registry(SHIPPED_REGISTRY),
        "store": store,
        "queue": queue,
        "served": [MODEL],
        "idempotency_key": "retry-me",
    }
    with pytest.raises(OperationalError):  # the gateway answers 503 with Retry-After
        jobs.submit(body, **submit)
    assert queue.depth(MODEL) == 0  # stored, never published

    job = jobs.submit(body, **submit)
    assert job.status == JobStatus.QUEUED
    assert queue.depth(MODEL) == 1  # the retry published it

    # once a worker has claimed it, a further retry returns the job and publishes nothing
    store.update(job.id, start("worker-1"))
    again = jobs.submit(body, **submit)
    assert again.id == job.id and again.status == JobStatus.RUNNING
    assert queue.depth(MODEL) == 1
