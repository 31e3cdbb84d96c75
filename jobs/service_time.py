"""Service-time estimates: how long a model takes to run one batch, per step count and batch size.

Workers report every batch they run (`observe`: model, steps, images, measured seconds); each
(model, steps, batch size) keeps an exponentially weighted moving mean. In Redis
(`RedisServiceTimes`) every gateway replica reads what every worker reported; embedded mode keeps
them in memory (`MemoryServiceTimes`), shared by its in-process workers and its gateway.

`predict_seconds` turns the estimates into a new job's predicted finish from the work ahead of it
(the jobs queued and running for its model), the live workers and the batch capacity: what SLA
admission (`service.admission`) compares with a request's deadline. What that model leaves out
(the time a job spends outside its batch: taking its message, encoding and storing its images;
batches slowed by other work on the machine) is learnt from the jobs themselves: a worker reports
each finished job's actual / predicted finish (`correct`), and the model's calibration factor
(`calibration`), which multiplies its predictions, moves towards making that ratio 1. Torch-free:
the gateway carries none.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from typing import Protocol

import redis

# Weight of the newest batch in the moving mean: about the last five batches count, so the
# estimate follows a slower backend or a busier machine within seconds without one slow batch
# (a garbage collection, a page fault) throwing it.
ALPHA = 0.3
# An estimate no batch has refreshed for this long is dropped: the model is cold again and
# admitted, so an estimate made on other hardware (or before an upgrade) cannot refuse a model's
# requests forever, which it could, since refused requests run no batches that would correct it.
TTL_S = 3600

_PREFIX = "hypersd:service_time"

# The calibration factor stays within these bounds, so a few odd jobs cannot make a model's
# predictions useless (a factor near 0 would admit everything, a huge one refuse everything).
CALIBRATION_RANGE = (0.25, 8.0)
_CALIBRATION = "calibration"  # its key: hypersd:service_time:<model>:calibration

# One atomic read-modify-write of the moving mean, so concurrent workers lose no report.
_OBSERVE = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local seconds, alpha = tonumber(ARGV[2]), tonumber(ARGV[3])
local new = seconds
if old then new = old + alpha * (seconds - old) end
redis.call('HSET', KEYS[1], ARGV[1], tostring(new))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return tostring(new)
"""


class ServiceTimes(Protocol):
    """Where batch service times are reported and read."""

    def observe(self, model: str, steps: int, batch_size: int, seconds: float) -> float:
        """Fold one batch's measured duration into the moving mean; returns the new mean."""
        ...

    def estimates(self, model: str, steps: int) -> dict[int, float]:
        """Mean seconds per batch, by batch size (images), for `model` at `steps`; {} when cold."""
        ...

    def correct(self, model: str, ratio: float) -> float:
        """Fold one job's actual / predicted finish into `model`'s calibration factor (a
        predicted finish already includes the factor); returns the new factor."""
        ...

    def calibration(self, model: str) -> float:
        """What `model`'s predictions are multiplied by (1 until a job has been reported)."""
        ...


def next_calibration(factor: float, ratio: float, alpha: float = ALPHA) -> float:
    """The calibration factor after a job whose actual / predicted finish was `ratio`.

    Multiplicative: a prediction made with `factor` that came out `ratio` times too short would
    have been right with `factor * ratio`; the factor moves that way by `alpha`, within
    `CALIBRATION_RANGE`.

    Raises:
        ValueError: `ratio` is not a finite positive number.
    """
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio must be a finite positive number, got {ratio}")
    low, high = CALIBRATION_RANGE
    return min(high, max(low, factor * (1 + alpha * (ratio - 1))))


def _check(batch_size: int, seconds: float) -> None:
    if batch_size < 1 or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"a batch has >= 1 images and a finite, non-negative duration; got {batch_size} "
            f"images in {seconds} s"
        )


class RedisServiceTimes:
    """The estimates in Redis: one hash per (model, steps), batch size -> mean seconds.

    Args:
        client: The Redis client (the job store's).
        alpha: Weight of the newest batch in the mean.
        ttl_s: Seconds without a report after which a (model, steps) is cold again.
    """

    def __init__(self, client: redis.Redis, alpha: float = ALPHA, ttl_s: int = TTL_S) -> None:
        self.redis = client
        self.alpha = alpha
        self.ttl_s = ttl_s
        self._observe = client.register_script(_OBSERVE)

    @staticmethod
    def _key(model: str, steps: int) -> str:
        return f"{_PREFIX}:{model}:{steps}"

    def observe(self, model: str, steps: int, batch_size: int, seconds: float) -> float:
        _check(batch_size, seconds)
        key = self._key(model, steps)
        mean = self._observe(keys=[key], args=[batch_size, seconds, self.alpha, self.ttl_s])
        return float(mean.decode() if isinstance(mean, bytes) else mean)

    def estimates(self, model: str, steps: int) -> dict[int, float]:
        raw = self.redis.hgetall(self._key(model, steps))
        return {int(size): float(mean) for size, mean in raw.items()}

    def correct(self, model: str, ratio: float) -> float:
        key = f"{_PREFIX}:{model}:{_CALIBRATION}"
        factor = [1.0]

        def update(pipe: redis.client.Pipeline) -> None:
            old = pipe.get(key)
            factor[0] = next_calibration(1.0 if old is None else float(old), ratio, self.alpha)
            pipe.multi()
            pipe.set(key, repr(factor[0]), ex=self.ttl_s)

        self.redis.transaction(update, key)
        return factor[0]

    def calibration(self, model: str) -> float:
        raw = self.redis.get(f"{_PREFIX}:{model}:{_CALIBRATION}")
        return 1.0 if raw is None else float(raw)


class MemoryServiceTimes:
    """The estimates in this process (embedded mode), with the same mean and expiry as Redis'."""

    def __init__(self, alpha: float = ALPHA, ttl_s: int = TTL_S) -> None:
        self.alpha = alpha
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        # (model, steps) -> (batch size -> mean, when last reported)
        self._means: dict[tuple[str, int], tuple[dict[int, float], float]] = {}
        self._factors: dict[str, tuple[float, float]] = {}  # model -> (factor, when reported)

    def observe(self, model: str, steps: int, batch_size: int, seconds: float) -> float:
        _check(batch_size, seconds)
        with self._lock:
            means = dict(self._estimates_locked(model, steps))
            old = means.get(batch_size)
            means[batch_size] = seconds if old is None else old + self.alpha * (seconds - old)
            self._means[(model, steps)] = (means, time.monotonic())
            return means[batch_size]

    def _estimates_locked(self, model: str, steps: int) -> dict[int, float]:
        means, at = self._means.get((model, steps), ({}, 0.0))
        return means if time.monotonic() - at < self.ttl_s else {}

    def estimates(self, model: str, steps: int) -> dict[int, float]:
        with self._lock:
            return dict(self._estimates_locked(model, steps))

    def correct(self, model: str, ratio: float) -> float:
        with self._lock:
            factor = next_calibration(self._calibration_locked(model), ratio, self.alpha)
            self._factors[model] = (factor, time.monotonic())
            return factor

    def _calibration_locked(self, model: str) -> float:
        factor, at = self._factors.get(model, (1.0, 0.0))
        return factor if time.monotonic() - at < self.ttl_s else 1.0

    def calibration(self, model: str) -> float:
        with self._lock:
            return self._calibration_locked(model)


def batch_seconds(estimates: dict[int, float], batch_size: int) -> float:
    """The predicted seconds of one batch of `batch_size` images, from the sizes measured.

    A measured size is its mean; between two measured sizes, the straight line between them; past
    the largest, its time per image times the size (no batching gain assumed: pessimistic); below
    the smallest, the smallest's time (fewer images are no slower to run, and a batch's fixed
    cost dominates small ones).

    Raises:
        ValueError: `estimates` is empty (a cold model has no prediction).
    """
    if not estimates:
        raise ValueError("no service-time estimate (cold model)")
    sizes = sorted(estimates)
    if batch_size in estimates:
        return estimates[batch_size]
    if batch_size < sizes[0]:
        return estimates[sizes[0]]
    if batch_size > sizes[-1]:
        return estimates[sizes[-1]] / sizes[-1] * batch_size
    above = bisect.bisect(sizes, batch_size)
    low, high = sizes[above - 1], sizes[above]
    share = (batch_size - low) / (high - low)
    return estimates[low] + share * (estimates[high] - estimates[low])


def predict_seconds(
    estimates: dict[int, float],
    *,
    images: int,
    jobs_ahead: int,
    workers: int,
    max_batch_size: int,
) -> float | None:
    """When a new job of `images` images would finish, in seconds from now; None when cold.

    The jobs ahead (queued and running for the model) are taken to be like the new one (the same
    images; the estimates are for its steps), and a running one as not yet begun: a pessimistic
    bound by at most one batch. The `workers` each run one batch at a time, of up to
    `max_batch_size` images (a job with more runs alone), and share the jobs evenly; the new job
    finishes with the last batch of its worker's share.

    Args:
        estimates: `ServiceTimes.estimates` for the job's model and steps.
        images: The new job's images (`n`).
        jobs_ahead: Jobs queued or running for the model.
        workers: Live workers for the model (at least one).
        max_batch_size: Most images per pipeline call.
    """
    if not estimates:
        return None
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    jobs_per_batch = max(1, max_batch_size // images)
    share = math.ceil((jobs_ahead + 1) / workers)  # jobs one worker runs, the new one last
    full, rest = divmod(share, jobs_per_batch)
    seconds = full * batch_seconds(estimates, jobs_per_batch * images)
    if rest:
        seconds += batch_seconds(estimates, rest * images)
    return seconds
