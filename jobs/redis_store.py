"""The Redis job store: jobs, images, heartbeats, quotas and webhook outbox shared by every
gateway replica and worker (`jobs.store.JobStore`)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager

import redis

from hypersd.contracts import JobStatus
from jobs.record import JobRecord
from jobs.states import Change
from jobs.store import FinishWaiters, IdempotencyConflict, Watch, WorkerInfo

log = logging.getLogger(__name__)

_PREFIX = "hypersd"
_FINISHED_CHANNEL = f"{_PREFIX}:finished"
# Queued jobs by when they were queued: the reaper publishes again one whose message is gone.
_QUEUED = f"{_PREFIX}:queued"
# Ended jobs whose webhook is still to be delivered, by when it is due (`jobs.webhooks`): added in
# the very transaction that ends the job, so no end is without its webhook, whoever ended it.
WEBHOOKS = f"{_PREFIX}:webhooks"
_WEBHOOK_ATTEMPTS = f"{_PREFIX}:webhook-attempts"


def _text(value: bytes | str) -> str:
    """The client returns bytes (no `decode_responses`: images are bytes)."""
    return value.decode() if isinstance(value, bytes) else value


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

# A job's change, applied only if the job is still the record it was made from (compare and set):
# the new record, then its effects on the indexes, images, outbox and notice channel, all at once.
# KEYS[1]: the job; ARGV: the record as read, the new one, then each effect as its argument count
# and its arguments (binary-safe: images are among them). Returns 1 when applied, else 0 (the job
# changed meanwhile, or expired). The effects' keys are not declared: one Redis, not a cluster.
_APPLY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
local i = 3
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
return 1
"""

_Arg = bytes | str | int | float  # a Redis command's argument

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
        self._apply = client.register_script(_APPLY)

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

    def _index(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        """A new job, in the queued jobs and its owner's indexes (all jobs; live jobs)."""
        pipe.zadd(_QUEUED, {record.id: record.created_at})
        pipe.zadd(f"{_QUEUED}:{record.model}", {record.id: record.created_at})
        keys = [self._owned_key(record.owner)]
        if record.owner is not None:
            keys.append(self._live_key(record.owner))
        for key in keys:
            pipe.zadd(key, {record.id: record.created_at})
            pipe.expire(key, 2 * self.ttl_s)

    def create(self, record: JobRecord, idempotency: tuple[str, str] | None = None) -> JobRecord:
        # The job outlives its images (kept for the TTL after they are made), so a client reads
        # "expired" rather than a 404. It is stored before the idempotency key is claimed, so a
        # key always points at a stored job.
        job_key = self._job_key(record.id)
        if idempotency is None:  # the job and its indexes in one round trip, at once
            with self.redis.pipeline() as pipe:
                pipe.set(job_key, record.model_dump_json(), ex=2 * self.ttl_s)
                self._index(pipe, record)
                pipe.execute()
            return record
        self.redis.set(job_key, record.model_dump_json(), ex=2 * self.ttl_s)
        key, fingerprint = idempotency
        idem_key = f"{_PREFIX}:idem:{key}"
        if self.redis.set(idem_key, f"{fingerprint}:{record.id}", nx=True, ex=self.ttl_s):
            with self.redis.pipeline() as pipe:
                self._index(pipe, record)
                pipe.execute()
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

    def _effects(self, job_id: str, new: JobRecord, images: Sequence[bytes]) -> list[_Arg]:
        """What storing `new` as job `job_id` changes besides the job (its `images`, indexes,
        outbox and notice), as `_APPLY`'s arguments: each command's argument count, then the
        command."""
        now = time.time()
        commands: list[tuple[_Arg, ...]] = [
            ("SET", f"{_PREFIX}:image:{job_id}:{index}", data, "EX", self.ttl_s)
            for index, data in enumerate(images)
        ]
        running = f"{_PREFIX}:running"
        commands.append(("SADD" if new.status == JobStatus.RUNNING else "SREM", running, job_id))
        if new.status == JobStatus.QUEUED:  # re-queued: its wait starts again
            commands.append(("ZADD", _QUEUED, now, job_id))
            commands.append(("ZADD", f"{_QUEUED}:{new.model}", new.created_at, job_id))
        else:
            commands.append(("ZREM", _QUEUED, job_id))
            # its place in line: by creation, so a re-queued job keeps it
            commands.append(("ZREM", f"{_QUEUED}:{new.model}", job_id))
        if new.status.terminal:
            commands.append(("HINCRBY", f"{_PREFIX}:finished", f"{new.model}\t{new.status}", 1))
            commands.append(("DEL", self._progress_key(job_id)))
            if new.webhook is not None:
                commands.append(("ZADD", WEBHOOKS, "NX", now, job_id))
            # the notice carries the ended record: a waiting request answers without a read
            commands.append(("PUBLISH", _FINISHED_CHANNEL, new.model_dump_json()))
            if new.owner is not None:
                commands.append(("ZREM", self._live_key(new.owner), job_id))
        return [part for command in commands for part in (len(command), *command)]

    def update(
        self,
        job_id: str,
        change: Change,
        *,
        images: Sequence[bytes] = (),
        known: JobRecord | None = None,
    ) -> JobRecord | None:
        key = self._job_key(job_id)
        old, read = known, None
        while True:
            if old is None:
                read = self.redis.get(key)
                if read is None:
                    return None
                old = JobRecord.model_validate_json(read)
            new = change(old)
            if new is None and read is None:  # `known` may be out of date: decide on the job
                old = None
                continue
            if new is None:
                return None
            # A record dumps to the very JSON it was stored as (`new.model_dump_json()` below).
            made_from = old.model_dump_json() if read is None else read
            effects = self._effects(job_id, new, images)
            if self._apply(keys=[key], args=[made_from, new.model_dump_json(), *effects]):
                return new
            old, read = None, None  # it changed since: apply the change to what it is now

    def watch(self, job_id: str) -> AbstractContextManager[Watch]:
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
                        self._notice(message["data"])
            except redis.RedisError as error:  # waiters re-read now and then meanwhile
                log.warning("job notices: %s; resubscribing", error)
                self._closing.wait(1.0)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _notice(self, data: bytes) -> None:
        """Wake the waiters of the job a notice (`data`) names, handing them the record it
        carries. A worker of an earlier release publishes the job id alone: its waiters re-read
        the job."""
        if data.startswith(b"{"):
            record = JobRecord.model_validate_json(data)
            self._waiters.wake(record.id, record)
        else:
            self._waiters.wake(_text(data))

    def close(self) -> None:
        """Stop the notice thread (if `watch` started it)."""
        self._closing.set()
        if self._listener is not None:
            self._listener.join()

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
