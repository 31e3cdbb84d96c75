"""A waiting request is woken when its job ends, in Redis (pub/sub) and in memory: no polling."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from hypersd.contracts import JobStatus
from jobs.memory_store import MemoryJobStore
from jobs.record import JobRecord
from jobs.redis_store import RedisJobStore
from jobs.states import finish, start
from jobs.store import JobStore
from service import job_service as jobs


def new_record() -> JobRecord:
    return JobRecord(
        id=uuid.uuid4().hex,
        model="m",
        prompt="a large red circle in the center on a white background",
        negative_prompt=None,
        steps=1,
        width=64,
        height=64,
        guidance_scale=0.0,
        eta=None,
        seeds=[0],
        output_format="png",
        response_format="url",
        created_at=time.time(),
    )


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "memory":
        yield MemoryJobStore(tmp_path / "images", ttl_s=60)
        return
    client = redis.Redis.from_url(f"{request.getfixturevalue('redis_url')}/3")
    redis_store = RedisJobStore(client, ttl_s=60)
    yield redis_store
    redis_store.close()
    client.close()


def test_wait_returns_when_the_job_ends_not_at_the_next_recheck(store: JobStore) -> None:
    record = store.create(new_record())
    store.update(record.id, start("w", "delivery"))

    def finish_soon() -> None:
        time.sleep(0.3)
        store.update(record.id, finish("w", JobStatus.SUCCEEDED))

    async def waited() -> tuple[JobRecord | None, float]:
        started = time.monotonic()
        result = await jobs.wait(store, record.id, timeout_s=10)
        return result, time.monotonic() - started

    worker = threading.Thread(target=finish_soon)
    worker.start()
    result, seconds = asyncio.run(waited())
    worker.join()
    assert result is not None and result.status == JobStatus.SUCCEEDED
    # Woken by the job's end: well before the 1 s fallback re-read.
    assert seconds < 0.8, seconds


def test_wait_gives_the_job_as_it_is_after_the_timeout(store: JobStore) -> None:
    record = store.create(new_record())
    started = time.monotonic()
    result = asyncio.run(jobs.wait(store, record.id, timeout_s=0.3))
    assert result is not None and result.status == JobStatus.QUEUED
    assert 0.3 <= time.monotonic() - started < 1.0
