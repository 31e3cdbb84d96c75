"""Quotas and backpressure: what a job submission must pass before it is stored, else a 429.

Three limits, each off unless configured, each answered at once with `Retry-After` instead of
letting the queue (and every client's latency) grow:

- a token bucket per API key (`rate_limit_per_s`, `rate_limit_burst`), in Redis so gateway
  replicas share it (in memory in embedded mode);
- a cap on a key's queued + running jobs (`max_jobs_in_flight`);
- a cap on the jobs waiting in a model's queue (`max_queue_depth`), for every caller.

The per-key limits need a key: with auth off there is none, and only the queue cap applies. The
checks read, then the job is stored: concurrent submissions can pass a cap by a few jobs.
"""

from __future__ import annotations

import math

from jobs.queue import JobQueue
from jobs.settings import Settings
from jobs.store import JobStore
from service.errors import ApiError

# What a client should wait before retrying when the wait depends on other jobs ending.
_BUSY_RETRY_S = 1


def _too_many(message: str, retry_after_s: float) -> ApiError:
    seconds = max(1, math.ceil(retry_after_s))
    return ApiError(429, "rate_limited", message, headers={"Retry-After": str(seconds)})


def admit(
    settings: Settings, store: JobStore, queue: JobQueue, owner: str | None, model: str
) -> None:
    """Refuse (429) a new job of `owner` for `model` that a limit does not allow.

    Raises:
        ApiError: 429 with `Retry-After`.
    """
    cap = settings.max_jobs_in_flight
    if owner is not None and cap is not None and store.jobs_in_flight(owner) >= cap:
        raise _too_many(f"{cap} jobs of this API key are queued or running", _BUSY_RETRY_S)
    depth = settings.max_queue_depth
    if depth is not None and queue.depth(model) >= depth:
        raise _too_many(f"the queue of {model!r} is full ({depth} jobs)", _BUSY_RETRY_S)
    # last: a job refused by a cap takes no token
    if owner is not None and settings.rate_limit_per_s is not None:
        wait_s = store.take_token(owner, settings.rate_limit_per_s, settings.rate_limit_burst)
        if wait_s > 0:
            raise _too_many(
                f"more than {settings.rate_limit_per_s:g} jobs per second: retry later", wait_s
            )
