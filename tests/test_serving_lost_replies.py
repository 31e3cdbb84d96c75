"""No job is lost when Redis drops between a write and its answer.

- The gateway stores a job, then publishes its message. If the publish fails, the client gets a
  503 and retries with its Idempotency-Key; the retry finds the stored job, and must publish it
  again, or no worker would ever see it.
- A worker claims a job (queued -> running) and the claim's reply is lost: the worker retries
  the write, and must recognise its own claim, or it would skip the job and leave it "running"
  on a live worker forever.

Real Redis (a database of its own, which no worker reads, so the messages can be counted), the
real job store, the real Celery queue and the real job runner on the shipped teacher; the one
failure is injected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError
from serving_fixtures import MODEL, SHIPPED_REGISTRY, one_slot_runner

from hypersd.contracts import GenerateRequest, JobStatus
from hypersd.registry import load_registry
from jobs.queue import CeleryQueue, create_celery
from jobs.record import JobRecord, resolve_request
from jobs.redis_store import RedisJobStore
from jobs.settings import Settings
from jobs.states import Change, start
from service import job_service as jobs

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
    store.update(job.id, start("worker-1", "delivery-1"))
    again = jobs.submit(body, **submit)
    assert again.id == job.id and again.status == JobStatus.RUNNING
    assert queue.depth(MODEL) == 1


class ClaimReplyLostOnce(RedisJobStore):
    """The real store, whose first claim reaches Redis but whose answer is lost."""

    lost = False

    def update(
        self,
        job_id: str,
        change: Change,
        *,
        images: Sequence[bytes] = (),
        known: JobRecord | None = None,
    ) -> JobRecord | None:
        record = super().update(job_id, change, images=images, known=known)
        if not self.lost and record is not None and record.status == JobStatus.RUNNING:
            self.lost = True
            raise redis.ConnectionError("connection lost before the reply")
        return record


def test_a_claim_whose_reply_was_lost_still_runs_the_job(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(f"{redis_url}/4")
    client.flushdb()
    store = ClaimReplyLostOnce(client, ttl_s=60)
    registry = load_registry(SHIPPED_REGISTRY)
    runner = one_slot_runner(registry.get(MODEL), store)
    try:
        body = GenerateRequest(prompt=PROMPT, model=MODEL, steps=1)
        job = store.create(resolve_request(body, registry))
        runner.run_job(job.id)
        done = store.get(job.id)
        assert store.lost, "the claim's reply was not lost: the test injected nothing"
        assert done is not None and done.status == JobStatus.SUCCEEDED, done
        assert done.attempts == 1 and store.get_image(job.id, 0) is not None
    finally:
        runner.close()
        store.close()
        client.flushdb()
        client.close()
