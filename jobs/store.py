"""Job state, images and worker heartbeats: in Redis, or in memory for embedded mode.

Both the gateway and the workers read and write jobs here, so the gateway answers status requests
without asking a worker. Every state change is an atomic read-modify-write (`update`) applying one
of `jobs.states`' transitions, so a cancel, a finishing worker and a reaper can race without losing
or resurrecting a job. Keys expire after the job TTL.

A request that waits for its job (`Prefer: wait=N`, the synchronous OpenAI route) is woken when the
job ends instead of polling: in Redis the change that ends a job also publishes its id on one
channel, which a gateway thread turns into wake-ups; in memory the update itself wakes the waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import redis
from pydantic import BaseModel

from hypersd.contracts import JobStatus
from jobs.record import JobRecord
from jobs.states import Change

log = logging.getLogger(__name__)

_PREFIX = "hypersd"
_FINISHED_CHANNEL = f"{_PREFIX}:finished"
# Queued jobs by when they were queued: the reaper publishes again one whose message is gone.
_QUEUED = f"{_PREFIX}:queued"
# Ended jobs whose webhook is still to be delivered, by when it is due (`jobs.webhooks`): added in
# the very transaction that ends the job, so no end is without its webhook, whoever ended it.
WEBHOOKS = f"{_PREFIX}:webhooks"
_WEBHOOK_ATTEMPTS = f"{_PREFIX}:webhook-attempts"

# What a store call raises while Redis is down or restarting (LOADING is a ConnectionError too):
# the gateway answers 503 and a worker holds a finished job's result until Redis is back.
STORE_DOWN = (redis.ConnectionError, redis.TimeoutError)


def _text(value: bytes | str) -> str:
    """The client returns bytes (no `decode_responses`: images are bytes)."""
    return value.decode() if isinstance(value, bytes) else value


class IdempotencyConflict(Exception):
    """An `Idempotency-Key` was reused with another request body."""


class FinishWaiters:
    """Asyncio waiters on jobs, woken from any thread when a job may have ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when `job_id` may have ended, for the current event loop."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                entries = self._waiters[job_id]
                entries.remove(entry)
                if not entries:
                    del self._waiters[job_id]

    def wake(self, job_id: str | None = None) -> None:
        """Wake the waiters of `job_id`, or all of them (after notices may have been missed)."""
        with self._lock:
            if job_id is None:
                entries = [entry for group in self._waiters.values() for entry in group]
            else:
                entries = list(self._waiters.get(job_id, ()))
        for loop, event in entries:
            # The loop may be closing at shutdown; its waiters are gone then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)


class WorkerInfo(BaseModel):
    """One worker's heartbeat."""

    id: str
    model: str
    backend: str
    capacity: int
    busy: int
    last_beat: float


class JobStore(Protocol):
    """Where jobs, their images and worker heartbeats live."""

    def create(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> JobRecord:
        """Store a new job, or return the job already made under the same idempotency key.

        Args:
            idempotency: (key, request fingerprint).

        Raises:
            IdempotencyConflict: the key is known with another fingerprint.
        """
        ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def idempotent_job(self, key: str) -> str | None:
        """The id of the job made under idempotency `key`, if any (a retry, not a new job)."""
        ...

    def list_jobs(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        """`owner`'s jobs, newest first: up to `limit` of them after the job `after` (a cursor
        that stays right while new jobs come), and whether there are more.

        Raises:
            KeyError: `after` is not one of `owner`'s jobs (or has expired).
        """
        ...

    def update(self, job_id: str, change: Change) -> JobRecord | None:
        """Apply `change` atomically; it returns the new record, or None to leave it as is.

        Returns the new record when it changed, else None.
        """
        ...

    def watch(self, job_id: str) -> AbstractContextManager[asyncio.Event]:
        """An event (of the running loop) set when the job may have ended.

        A hint, not a guarantee: re-read the job when it is set, and now and then anyway, since a
        notice can be missed (e.g. while the store reconnects).
        """
        ...

    def put_images(self, job_id: str, images: list[bytes]) -> None: ...

    def get_image(self, job_id: str, index: int) -> bytes | None: ...

    def running_jobs(self) -> list[str]:
        """Ids of jobs that a worker has started (for the reaper)."""
        ...

    def queued_before(self, seconds_ago: float) -> list[str]:
        """Ids of jobs queued (created, or re-queued) at least `seconds_ago` (for the reaper)."""
        ...

    def finished_counts(self) -> dict[tuple[str, str], int]:
        """Finished jobs by (model, status), for the gateway's metrics."""
        ...

    def beat(self, info: WorkerInfo, ttl: float) -> None:
        """Record a worker's heartbeat; it counts as alive for `ttl` seconds."""
        ...

    def forget_worker(self, worker_id: str) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    def worker_alive(self, worker_id: str) -> bool: ...

    def ping(self) -> bool: ...

    def jobs_in_flight(self, owner: str) -> int:
        """How many of `owner`'s jobs are queued or running."""
        ...

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        """Take a token from a token bucket (`burst` tokens, refilled at `rate_per_s`).

        Returns 0 when one was taken, else the seconds until one will be there.
        """
        ...

    def set_progress(self, job_id: str, step: int) -> None:
        """Record that a running job has done `step` denoising steps."""
        ...

    def progress(self, job_id: str) -> int | None:
        """The denoising steps a running job has done, if it reported any."""
        ...

    def queue_position(self, record: JobRecord) -> int | None:
        """How many jobs for the model of the queued job `record` are ahead of it."""
        ...

    def take_webhooks(self, lease_s: float, limit: int) -> list[tuple[str, int]]:
        """Take up to `limit` due webhooks, each leased for `lease_s` (a deliverer that dies
        leaves it due again then); returns (job id, attempt number from 1)."""
        ...

    def webhook_later(self, job_id: str, at: float) -> None:
        """Make a taken webhook due again at Unix time `at` (a retry)."""
        ...

    def webhook_done(self, job_id: str) -> None:
        """Drop a webhook: delivered, or out of attempts."""
        ...


# The token bucket, atomic in Redis and timed by Redis' clock, so gateway replicas share one
# bucket per key whatever their own clocks say. State: a hash {tokens, at}, expiring once full.
_TAKE_TOKEN = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""

# Take the due webhooks and lease them (due again at now + lease), counting each attempt; atomic,
# so gateway replicas never deliver one webhook at once.
_TAKE_WEBHOOKS = """
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local taken = {}
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + lease, id)
  table.insert(taken, id)
  table.insert(taken, redis.call('HINCRBY', KEYS[2], id, 1))
end
return taken
"""


class RedisJobStore:
    """Jobs as JSON strings (`hypersd:job:<id>`), images as bytes, both with the job TTL.

    The first `watch` starts a thread listening to the channel of ended jobs (only gateways
    watch; workers only publish); `close` stops it.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._waiters = FinishWaiters()
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._closing = threading.Event()
        self._take_token = client.register_script(_TAKE_TOKEN)
        self._take_webhooks = client.register_script(_TAKE_WEBHOOKS)

    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"{_PREFIX}:job:{job_id}"

    @staticmethod
    def _live_key(owner: str) -> str:
        """An owner's queued and running jobs, scored by creation time."""
        return f"{_PREFIX}:live:{owner}"

    @staticmethod
    def _owned_key(owner: str | None) -> str:
        """All of an owner's jobs (auth off: everyone's), scored by creation time."""
        return f"{_PREFIX}:jobs:{owner or ''}"

    def _index(self, record: JobRecord) -> None:
        """A new job, in the queued jobs and its owner's indexes (all jobs; live jobs)."""
        with self.redis.pipeline() as pipe:
            pipe.zadd(_QUEUED, {record.id: record.created_at})
            pipe.zadd(f"{_QUEUED}:{record.model}", {record.id: record.created_at})
            keys = [self._owned_key(record.owner)]
            if record.owner is not None:
                keys.append(self._live_key(record.owner))
            for key in keys:
                pipe.zadd(key, {record.id: record.created_at})
                pipe.expire(key, 2 * self.ttl_s)
            pipe.execute()

    def create(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> JobRecord:
        # The job outlives its images (kept for the TTL after they are made), so a client reads
        # "expired" rather than a 404. It is stored before the idempotency key is claimed, so a
        # key always points at a stored job.
        job_key = self._job_key(record.id)
        self.redis.set(job_key, record.model_dump_json(), ex=2 * self.ttl_s)
        if idempotency is None:
            self._index(record)
            return record
        key, fingerprint = idempotency
        idem_key = f"{_PREFIX}:idem:{key}"
        if self.redis.set(idem_key, f"{fingerprint}:{record.id}", nx=True, ex=self.ttl_s):
            self._index(record)
            return record
        self.redis.delete(job_key)
        known_fingerprint, _, job_id = _text(self.redis.get(idem_key) or b"").partition(":")
        known = self.get(job_id)
        if known_fingerprint != fingerprint or known is None:
            raise IdempotencyConflict(key)
        return known

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self._job_key(job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    def idempotent_job(self, key: str) -> str | None:
        known = self.redis.get(f"{_PREFIX}:idem:{key}")
        return None if known is None else _text(known).partition(":")[2]

    def list_jobs(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        index = self._owned_key(owner)
        self.redis.zremrangebyscore(index, "-inf", time.time() - 2 * self.ttl_s)
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(index, after)
            if not isinstance(rank, int):  # None: not in the index
                raise KeyError(after)
            start = rank + 1
        # one more than asked for: whether there are more
        members = self.redis.zrevrange(index, start, start + limit)
        ids = [_text(member) for member in members if isinstance(member, bytes | str)]
        raws = self.redis.mget([self._job_key(job_id) for job_id in ids[:limit]]) if ids else []
        records = [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]
        return records, len(ids) > limit

    def update(self, job_id: str, change: Change) -> JobRecord | None:
        key = self._job_key(job_id)
        result: list[JobRecord] = []

        def transaction(pipe: redis.client.Pipeline) -> None:
            result.clear()
            raw = pipe.get(key)
            if raw is None:
                return
            new = change(JobRecord.model_validate_json(raw))
            if new is None:
                return
            pipe.multi()
            pipe.set(key, new.model_dump_json(), keepttl=True)
            if new.status == JobStatus.RUNNING:
                pipe.sadd(f"{_PREFIX}:running", job_id)
            else:
                pipe.srem(f"{_PREFIX}:running", job_id)
            if new.status == JobStatus.QUEUED:  # re-queued: its wait starts again
                pipe.zadd(_QUEUED, {job_id: time.time()})
                pipe.zadd(f"{_QUEUED}:{new.model}", {job_id: new.created_at})
            else:
                pipe.zrem(_QUEUED, job_id)
                # its place in line: by creation, so a re-queued job keeps it
                pipe.zrem(f"{_QUEUED}:{new.model}", job_id)
            if new.status.terminal:
                pipe.hincrby(f"{_PREFIX}:finished", f"{new.model}\t{new.status}", 1)
                pipe.delete(self._progress_key(job_id))
                if new.webhook is not None:
                    pipe.zadd(WEBHOOKS, {job_id: time.time()}, nx=True)
                pipe.publish(_FINISHED_CHANNEL, job_id)
                if new.owner is not None:
                    pipe.zrem(self._live_key(new.owner), job_id)
            result.append(new)

        self.redis.transaction(transaction, key)
        return result[0] if result else None

    def watch(self, job_id: str) -> AbstractContextManager[asyncio.Event]:
        with self._listener_lock:
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="job-notices", daemon=True
                )
                self._listener.start()
        return self._waiters.watch(job_id)

    def _listen(self) -> None:
        """Turn the ended-job channel into wake-ups, resubscribing after Redis comes back."""
        while not self._closing.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(_FINISHED_CHANNEL)
                # Jobs may have ended while this was not subscribed: let every waiter re-read.
                self._waiters.wake()
                while not self._closing.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._waiters.wake(_text(message["data"]))
            except redis.RedisError as error:  # waiters re-read now and then meanwhile
                log.warning("job notices: %s; resubscribing", error)
                self._closing.wait(1.0)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def close(self) -> None:
        """Stop the notice thread (if `watch` started it)."""
        self._closing.set()
        if self._listener is not None:
            self._listener.join()

    def put_images(self, job_id: str, images: list[bytes]) -> None:
        with self.redis.pipeline() as pipe:
            for index, data in enumerate(images):
                pipe.set(f"{_PREFIX}:image:{job_id}:{index}", data, ex=self.ttl_s)
            pipe.execute()

    def get_image(self, job_id: str, index: int) -> bytes | None:
        data = self.redis.get(f"{_PREFIX}:image:{job_id}:{index}")
        return data if isinstance(data, bytes) else None

    def running_jobs(self) -> list[str]:
        return sorted(_text(member) for member in self.redis.smembers(f"{_PREFIX}:running"))

    def queued_before(self, seconds_ago: float) -> list[str]:
        now = time.time()
        # a job that expired while queued leaves the index with its key
        self.redis.zremrangebyscore(_QUEUED, "-inf", now - 2 * self.ttl_s)
        members = self.redis.zrangebyscore(_QUEUED, "-inf", now - seconds_ago)
        return [_text(member) for member in members if isinstance(member, bytes | str)]

    def finished_counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for field, value in self.redis.hgetall(f"{_PREFIX}:finished").items():
            model, _, status = _text(field).partition("\t")
            counts[(model, status)] = int(value)
        return counts

    def beat(self, info: WorkerInfo, ttl: float) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(f"{_PREFIX}:worker:{info.id}", info.model_dump_json(), px=int(ttl * 1000))
            pipe.sadd(f"{_PREFIX}:workers", info.id)
            pipe.execute()

    def forget_worker(self, worker_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(f"{_PREFIX}:worker:{worker_id}")
            pipe.srem(f"{_PREFIX}:workers", worker_id)
            pipe.execute()

    def workers(self) -> list[WorkerInfo]:
        alive = []
        for member in self.redis.smembers(f"{_PREFIX}:workers"):
            raw = self.redis.get(f"{_PREFIX}:worker:{_text(member)}")
            if raw is None:
                # Expired beat: keep the set small, the reaper asks worker_alive, not this set.
                self.redis.srem(f"{_PREFIX}:workers", member)
            else:
                alive.append(WorkerInfo.model_validate_json(raw))
        return alive

    def worker_alive(self, worker_id: str) -> bool:
        return bool(self.redis.exists(f"{_PREFIX}:worker:{worker_id}"))

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def jobs_in_flight(self, owner: str) -> int:
        live = self._live_key(owner)
        with self.redis.pipeline() as pipe:
            # a job whose key expired without ending (lost for good) stops counting then
            pipe.zremrangebyscore(live, "-inf", time.time() - 2 * self.ttl_s)
            pipe.zcard(live)
            return int(pipe.execute()[1])

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        key = f"{_PREFIX}:bucket:{bucket}"
        return float(_text(self._take_token(keys=[key], args=[rate_per_s, burst])))

    @staticmethod
    def _progress_key(job_id: str) -> str:
        return f"{_PREFIX}:progress:{job_id}"

    def set_progress(self, job_id: str, step: int) -> None:
        self.redis.set(self._progress_key(job_id), step, ex=self.ttl_s)

    def progress(self, job_id: str) -> int | None:
        raw = self.redis.get(self._progress_key(job_id))
        return None if raw is None else int(raw)

    def queue_position(self, record: JobRecord) -> int | None:
        line = f"{_QUEUED}:{record.model}"
        # a job that expired while queued leaves the line with its key
        self.redis.zremrangebyscore(line, "-inf", time.time() - 2 * self.ttl_s)
        rank = self.redis.zrank(line, record.id)
        return rank if isinstance(rank, int) else None

    def take_webhooks(self, lease_s: float, limit: int) -> list[tuple[str, int]]:
        flat = self._take_webhooks(
            keys=[WEBHOOKS, _WEBHOOK_ATTEMPTS], args=[time.time(), lease_s, limit]
        )
        return [(_text(flat[k]), int(flat[k + 1])) for k in range(0, len(flat), 2)]

    def webhook_later(self, job_id: str, at: float) -> None:
        self.redis.zadd(WEBHOOKS, {job_id: at}, xx=True)

    def webhook_done(self, job_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(WEBHOOKS, job_id)
            pipe.hdel(_WEBHOOK_ATTEMPTS, job_id)
            pipe.execute()


class MemoryJobStore:
    """Embedded mode: jobs in a dict (one process), images in a local folder."""

    def __init__(self, images_dir: Path, ttl_s: int) -> None:
        self.images_dir = images_dir
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
        self._idempotency: dict[str, tuple[str, str]] = {}
        self._finished: Counter[tuple[str, str]] = Counter()
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._waiters = FinishWaiters()
        self._buckets: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, at)
        self._progress: dict[str, int] = {}
        self._webhooks: dict[str, tuple[float, int]] = {}  # job -> (due at, attempts)

    def _expire(self) -> None:
        """Drop jobs older than twice the TTL, as Redis does (called under the lock)."""
        cutoff = time.time() - 2 * self.ttl_s
        for job_id in [j for j, record in self._jobs.items() if record.created_at < cutoff]:
            del self._jobs[job_id]
            for path in self.images_dir.glob(f"{job_id}-*"):
                path.unlink(missing_ok=True)

    def create(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> JobRecord:
        with self._lock:
            self._expire()
            if idempotency is not None:
                key, fingerprint = idempotency
                known = self._idempotency.get(key)
                if known is not None and known[1] in self._jobs:
                    if known[0] != fingerprint:
                        raise IdempotencyConflict(key)
                    return self._jobs[known[1]]
                self._idempotency[key] = (fingerprint, record.id)
            self._jobs[record.id] = record
            return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    def idempotent_job(self, key: str) -> str | None:
        with self._lock:
            known = self._idempotency.get(key)
            return None if known is None else known[1]

    def list_jobs(
        self, owner: str | None, limit: int, after: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        with self._lock:
            self._expire()
            owned = sorted(
                (record for record in self._jobs.values() if record.owner == owner),
                key=lambda record: record.created_at,
                reverse=True,
            )
        ids = [record.id for record in owned]
        if after is not None and after not in ids:
            raise KeyError(after)
        start = 0 if after is None else ids.index(after) + 1
        return owned[start : start + limit], len(owned) > start + limit

    def update(self, job_id: str, change: Change) -> JobRecord | None:
        with self._lock:
            record = self._jobs.get(job_id)
            new = None if record is None else change(record)
            if new is not None:
                self._jobs[job_id] = new
                if new.status.terminal:
                    self._finished[(new.model, new.status.value)] += 1
                    self._progress.pop(job_id, None)
                    if new.webhook is not None:
                        self._webhooks.setdefault(job_id, (time.time(), 0))
        if new is not None and new.status.terminal:
            self._waiters.wake(job_id)
        return new

    def watch(self, job_id: str) -> AbstractContextManager[asyncio.Event]:
        return self._waiters.watch(job_id)

    def put_images(self, job_id: str, images: list[bytes]) -> None:
        for index, data in enumerate(images):
            (self.images_dir / f"{job_id}-{index}").write_bytes(data)

    def get_image(self, job_id: str, index: int) -> bytes | None:
        if self.get(job_id) is None:
            return None
        path = self.images_dir / f"{job_id}-{index}"
        return path.read_bytes() if path.is_file() else None

    def running_jobs(self) -> list[str]:
        with self._lock:
            return [j for j, record in self._jobs.items() if record.status == JobStatus.RUNNING]

    def queued_before(self, seconds_ago: float) -> list[str]:
        # in memory, only `created_at`: embedded mode's queue is in-process and loses nothing
        cutoff = time.time() - seconds_ago
        with self._lock:
            return [
                job_id
                for job_id, record in self._jobs.items()
                if record.status == JobStatus.QUEUED and record.created_at <= cutoff
            ]

    def finished_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._finished)

    def beat(self, info: WorkerInfo, ttl: float) -> None:
        with self._lock:
            self._workers[info.id] = (info, time.time() + ttl)

    def forget_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    def workers(self) -> list[WorkerInfo]:
        now = time.time()
        with self._lock:
            return [info for info, until in self._workers.values() if until > now]

    def worker_alive(self, worker_id: str) -> bool:
        return any(info.id == worker_id for info in self.workers())

    def ping(self) -> bool:
        return True

    def jobs_in_flight(self, owner: str) -> int:
        with self._lock:
            return sum(
                1
                for record in self._jobs.values()
                if record.owner == owner and not record.status.terminal
            )

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(bucket, (float(burst), now))
            tokens = min(burst, tokens + (now - at) * rate_per_s)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / rate_per_s
            self._buckets[bucket] = (tokens, now)
            return wait

    def set_progress(self, job_id: str, step: int) -> None:
        with self._lock:
            self._progress[job_id] = step

    def progress(self, job_id: str) -> int | None:
        with self._lock:
            return self._progress.get(job_id)

    def queue_position(self, record: JobRecord) -> int | None:
        with self._lock:
            if record.status != JobStatus.QUEUED:
                return None
            return sum(
                1
                for other in self._jobs.values()
                if other.model == record.model
                and other.status == JobStatus.QUEUED
                and other.created_at < record.created_at
            )

    def take_webhooks(self, lease_s: float, limit: int) -> list[tuple[str, int]]:
        now = time.time()
        with self._lock:
            due = [job_id for job_id, (at, _) in self._webhooks.items() if at <= now][:limit]
            for job_id in due:
                self._webhooks[job_id] = (now + lease_s, self._webhooks[job_id][1] + 1)
            return [(job_id, self._webhooks[job_id][1]) for job_id in due]

    def webhook_later(self, job_id: str, at: float) -> None:
        with self._lock:
            if job_id in self._webhooks:
                self._webhooks[job_id] = (at, self._webhooks[job_id][1])

    def webhook_done(self, job_id: str) -> None:
        with self._lock:
            self._webhooks.pop(job_id, None)
