"""The job store is the source of truth (issue 11, no lost job): a job queued whose Celery message
is gone (lost between Redis handing it out and kombu recording it unacked, around a Redis restart)
is published again by the workers' reaper, instead of staying queued for good.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from serving_fixtures import MODEL, SHIPPED_REGISTRY, Stack

from hypersd.contracts import GenerateRequest
from hypersd.registry import load_registry
from jobs.liveness import republish_lost
from jobs.queue import CeleryQueue, create_celery
from jobs.record import JobRecord, resolve_request
from jobs.redis_store import RedisJobStore
from jobs.settings import Settings
from jobs.states import cancel

PROMPT = "a small orange circle on a white background"
REGISTRY = load_registry(SHIPPED_REGISTRY)


def _job(age_s: float) -> JobRecord:
    """A job for MODEL created `age_s` ago."""
    record = resolve_request(GenerateRequest(prompt=PROMPT, model=MODEL, steps=1), REGISTRY)
    return record.model_copy(update={"created_at": time.time() - age_s})


@pytest.fixture
def parts(redis_url: str) -> Iterator[tuple[RedisJobStore, CeleryQueue]]:
    """Store and queue on a Redis database no worker reads."""
    url = f"{redis_url}/5"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RedisJobStore(client, ttl_s=60)
    yield store, CeleryQueue(create_celery(Settings(redis_url=url)), client)
    store.close()
    client.flushdb()
    client.close()


def test_only_an_old_queued_job_without_a_message_is_published_again(
    parts: tuple[RedisJobStore, CeleryQueue],
) -> None:
    store, queue = parts
    lost, published, young, canceled = _job(30), _job(30), _job(0), _job(30)
    for record in (lost, published, young, canceled):
        store.create(record)
    queue.submit(published)
    store.update(canceled.id, cancel)

    assert republish_lost(store, queue, after_s=5) == [lost.id]
    assert queue.depth(MODEL) == 2 and queue.message_job_ids(MODEL) == {lost.id, published.id}
    assert republish_lost(store, queue, after_s=5) == []  # its message is there now


def test_a_worker_runs_a_job_whose_message_was_lost(stack: Stack) -> None:
    """Stored as the gateway stores it, never published: the stack worker's reaper (one
    heartbeat lifetime, 1.5 s here) publishes it and the job runs."""
    client = redis.Redis.from_url(stack.redis_url)
    store = RedisJobStore(client, ttl_s=3600)
    record = _job(10)
    store.create(record)
    try:
        deadline = time.monotonic() + 30
        status = "queued"
        while status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = httpx.get(f"{stack.server.url}/v1/generations/{record.id}").json()
            status = job["status"]
        assert status == "succeeded", job
    finally:
        store.close()
        client.close()
