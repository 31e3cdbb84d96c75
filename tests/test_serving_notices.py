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
from jobs.states import cancel, finish, start
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


class ReadsCounted:
    """A real store whose job reads are counted (everything else goes straight to it)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.reads = 0

    def get(self, job_id: str) -> JobRecord | None:
        self.reads += 1
        return self.store.get(job_id)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_a_waiter_is_handed_the_ended_job_by_the_notice_and_reads_it_once(store: JobStore) -> None:
    # A gateway's notice listener is up after its first wait (on starting, it wakes every
    # waiter to re-read, for the notices it may have missed): this test's wait is a later one.
    asyncio.run(jobs.wait(store, store.create(new_record()).id, timeout_s=0.3))
    record = store.create(new_record())
    claimed = store.update(record.id, start("w", "delivery"))
    counted = ReadsCounted(store)

    def finish_soon() -> None:
        time.sleep(0.3)
        store.update(record.id, finish("w", JobStatus.SUCCEEDED), known=claimed)

    worker = threading.Thread(target=finish_soon)
    worker.start()
    result = asyncio.run(jobs.wait(counted, record.id, timeout_s=10))  # type: ignore[arg-type]
    worker.join()
    assert result is not None and result.status == JobStatus.SUCCEEDED
    assert result == store.get(record.id)  # the notice's record is the stored one
    assert counted.reads == 1  # the read before waiting; the end came with its notice


def test_the_images_land_with_the_end_and_a_job_canceled_meanwhile_gets_none(
    store: JobStore,
) -> None:
    done = store.create(new_record())
    claimed = store.update(done.id, start("w", "delivery"))
    ended = store.update(
        done.id, finish("w", JobStatus.SUCCEEDED), images=[b"png-0", b"png-1"], known=claimed
    )
    assert ended is not None and ended.status == JobStatus.SUCCEEDED
    assert store.get(done.id) == ended
    assert [store.get_image(done.id, k) for k in range(2)] == [b"png-0", b"png-1"]

    canceled = store.create(new_record())
    claimed = store.update(canceled.id, start("w", "delivery"))
    store.update(canceled.id, cancel)
    # `known` is out of date: the store finds the job canceled and leaves it so, without images
    late = store.update(
        canceled.id, finish("w", JobStatus.SUCCEEDED), images=[b"png-0"], known=claimed
    )
    assert late is None
    stored = store.get(canceled.id)
    assert stored is not None and stored.status == JobStatus.CANCELED
    assert store.get_image(canceled.id, 0) is None


def test_a_claimed_job_ends_in_one_redis_command(redis_url: str) -> None:
    client = redis.Redis.from_url(f"{redis_url}/3")
    store = RedisJobStore(client, ttl_s=60)
    record = store.create(new_record())
    claimed = store.update(record.id, start("w", "delivery"))
    before = client.info("commandstats")
    store.update(record.id, finish("w", JobStatus.SUCCEEDED), images=[b"png"], known=claimed)
    after = client.info("commandstats")
    calls = {
        name.removeprefix("cmdstat_"): stats["calls"] - before.get(name, {"calls": 0})["calls"]
        for name, stats in after.items()
        if stats["calls"] != before.get(name, {"calls": 0})["calls"]
    }
    # Commands a script runs count too: the end, the image, the indexes and the notice went in
    # one script, whose compare is the only read (no GET or WATCH before it).
    assert calls.get("evalsha") == 1 and calls.get("get") == 1, calls
    assert not {"watch", "multi", "exec"} & calls.keys(), calls
    store.close()
    client.close()


def test_a_notice_naming_the_job_alone_still_wakes_its_waiter(redis_url: str) -> None:
    """What a worker of an earlier release publishes: the job id, without the record."""
    client = redis.Redis.from_url(f"{redis_url}/3")
    store = RedisJobStore(client, ttl_s=60)
    asyncio.run(jobs.wait(store, store.create(new_record()).id, timeout_s=0.3))  # listener up
    record = store.create(new_record())
    ended = record.model_copy(update={"status": JobStatus.SUCCEEDED, "finished_at": time.time()})

    def finish_as_before() -> None:
        time.sleep(0.3)
        client.set(f"hypersd:job:{record.id}", ended.model_dump_json(), keepttl=True)
        client.publish("hypersd:finished", record.id)

    async def waited() -> tuple[JobRecord | None, float]:
        started = time.monotonic()
        result = await jobs.wait(store, record.id, timeout_s=10)
        return result, time.monotonic() - started

    worker = threading.Thread(target=finish_as_before)
    worker.start()
    result, seconds = asyncio.run(waited())
    worker.join()
    assert result == ended
    assert seconds < 0.8, seconds  # woken by the notice, not the 1 s re-read
    store.close()
    client.close()
