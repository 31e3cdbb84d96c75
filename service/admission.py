"""SLA-aware admission: a job predicted to miss its deadline is refused at once, not run late.

A request's deadline is its `deadline_ms` (from submission to finish), else its model's `sla_ms`
in the registry; without either, nothing here applies. The prediction
(`jobs.service_time.predict_seconds`) comes from what the gateway knows without asking a worker:
the jobs queued for the model (`JobQueue.depth`), the live workers serving it and how many jobs
they hold (their heartbeats), the batch capacity (`max_batch_size`) and the moving estimate of a
batch's service time that workers report. A job predicted to finish later than
`deadline_headroom` x its deadline (0.8: the rest is room for the prediction's error) is refused
with 429 and the predicted wait; with no live worker for its model, 503 (no deadline can be met
before a worker starts). A model without an estimate yet (cold: nothing has run since the
estimates expired) is admitted, and its first batches make the estimate. In embedded mode (or
with `HYPERSD_SHARED_DEVICE`) the models share one device, so a job also waits for the work
queued for the others (`Predictor.shared`).

A series (registry `series`) is one model at several step counts: `{"model": "shapes-hyper",
"steps": "auto"}` with a deadline gets the member with the most steps predicted to meet it, so
under load requests keep their deadline by dropping steps; when even the fewest steps cannot,
429 as above.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from hypersd.contracts import GenerateRequest, RequestError
from hypersd.registry import ModelSpec, Registry
from jobs.queue import JobQueue
from jobs.service_time import ServiceTimes, predict_seconds
from jobs.store import JobStore, WorkerInfo
from service.errors import DeadlineError

# What a client is told to wait when no worker serves the model: about a worker's heartbeat
# lifetime, after which a worker that was starting shows up.
_NO_WORKER_RETRY_S = 5


@dataclass(frozen=True)
class Prediction:
    """A new job's predicted finish.

    Args:
        model: The model it would run on.
        workers: Live workers serving the model.
        seconds: Predicted seconds from now to its end; None when cold or without a worker.
    """

    model: str
    workers: int
    seconds: float | None

    def meets(self, deadline_ms: float, headroom: float = 1.0) -> bool:
        """Whether a worker serves it and it is cold or predicted to end within `headroom` x the
        deadline."""
        if self.workers == 0:
            return False
        return self.seconds is None or self.seconds * 1000 <= headroom * deadline_ms


@dataclass(frozen=True)
class Predictor:
    """Predicts jobs' finishes from the queue, the heartbeats and the service-time estimates.

    Args:
        store: The job store (its heartbeats are the live workers).
        queue: The queue (its depth per model).
        service_times: The estimates workers report; None: every model is cold.
        max_batch_size: Most images per pipeline call (the workers' setting).
        shared: The models whose workers share one device (embedded mode, or
            `HYPERSD_SHARED_DEVICE`), with the steps their waiting jobs are taken to have (their
            default): a job then waits for the work ahead of every model, not only its own.
            None: each worker has its own device (a Celery worker per GPU), and only the
            model's own queue counts.
        headroom: A job meets its deadline when predicted to end within this share of it: the
            rest is room for the prediction's error (a queue kept full to the deadline would
            otherwise miss it about half the time).
    """

    store: JobStore
    queue: JobQueue
    service_times: ServiceTimes | None
    max_batch_size: int
    shared: dict[str, int] | None = None
    headroom: float = 1.0

    def workers(self) -> list[WorkerInfo]:
        """The live workers, read once per request."""
        return self.store.workers()

    def predict(self, model: str, steps: int, images: int, workers: list[WorkerInfo]) -> Prediction:
        """The finish of a new job of `images` images of `model` at `steps`."""
        serving = [worker for worker in workers if worker.model == model]
        if not serving or self.service_times is None:
            return Prediction(model, len(serving), None)
        estimates = self.service_times.estimates(model, steps)
        if not estimates:
            return Prediction(model, len(serving), None)
        ahead = self._jobs_ahead(model, serving)
        seconds = predict_seconds(
            estimates,
            images=images,
            jobs_ahead=ahead,
            workers=len(serving),
            max_batch_size=self.max_batch_size,
        )
        assert seconds is not None  # estimates are not empty
        for other, other_steps in (self.shared or {}).items():
            if other != model:
                seconds += self._backlog(other, other_steps, workers)
        # what the model of the work ahead leaves out, learnt from the jobs' actual finishes
        seconds *= self.service_times.calibration(model)
        return Prediction(model, len(serving), seconds)

    def _jobs_ahead(self, model: str, serving: list[WorkerInfo]) -> int:
        """Jobs queued for `model` plus those its workers hold."""
        return self.queue.depth(model) + sum(worker.busy for worker in serving)

    def _backlog(self, model: str, steps: int, workers: list[WorkerInfo]) -> float:
        """Seconds of work ahead for another model on a shared device (0 when cold or idle)."""
        serving = [worker for worker in workers if worker.model == model]
        ahead = self._jobs_ahead(model, serving)
        if not serving or not ahead or self.service_times is None:
            return 0.0
        # its waiting jobs, taken to be of one image at `steps`: the last one ends the backlog
        seconds = predict_seconds(
            self.service_times.estimates(model, steps),
            images=1,
            jobs_ahead=ahead - 1,
            workers=len(serving),
            max_batch_size=self.max_batch_size,
        )
        return seconds or 0.0


def _refusal(predictions: list[Prediction], deadline_ms: float, headroom: float) -> DeadlineError:
    """429 with the shortest predicted wait of `predictions`; 503 when no worker serves any."""
    served = [p for p in predictions if p.workers > 0 and p.seconds is not None]
    models = ", ".join(repr(p.model) for p in predictions)
    if not served:
        message = (
            f"no live worker serves {models}: the deadline of {deadline_ms:g} ms cannot be met"
        )
        return DeadlineError(
            503, message, deadline_ms=deadline_ms, retry_after_s=_NO_WORKER_RETRY_S
        )
    best = min(served, key=lambda p: p.seconds or 0.0)
    assert best.seconds is not None
    # Retry-After: when the work ahead now would have drained enough to meet the deadline.
    retry_after_s = max(1, math.ceil(best.seconds - headroom * deadline_ms / 1000))
    message = (
        f"predicted to finish in {best.seconds:.2f} s ({best.model!r}), and a deadline of "
        f"{deadline_ms / 1000:g} s admits up to {headroom * deadline_ms / 1000:.2f} s: retry in "
        f"about {retry_after_s} s"
    )
    return DeadlineError(
        429,
        message,
        predicted_ms=round(best.seconds * 1000, 1),
        deadline_ms=deadline_ms,
        retry_after_s=retry_after_s,
    )


def check_deadline(
    predictor: Predictor, spec: ModelSpec, steps: int, images: int, deadline_ms: float
) -> Prediction:
    """The job's prediction when it meets `deadline_ms` (or is cold).

    Raises:
        DeadlineError: 429 with the predicted wait, or 503 without a live worker.
    """
    prediction = predictor.predict(spec.name, steps, images, predictor.workers())
    if not prediction.meets(deadline_ms, predictor.headroom):
        raise _refusal([prediction], deadline_ms, predictor.headroom)
    return prediction


def series_deadline(members: list[ModelSpec]) -> float | None:
    """A series' default deadline: the strictest `sla_ms` of its members, if any has one."""
    slas = [spec.sla_ms for spec in members if spec.sla_ms is not None]
    return min(slas) if slas else None


def choose_in_series(
    body: GenerateRequest,
    registry: Registry,
    served: Collection[str],
    predictor: Predictor | None,
    *,
    refuse: bool = True,
) -> tuple[GenerateRequest, Prediction | None]:
    """For a request naming a series: the request for its chosen member, and the prediction.

    The member is the one with the most steps whose predicted finish meets the deadline (a cold
    one meets any). With `refuse` False (a retry of a job already made, which the idempotency
    key returns whatever is chosen here) the fewest-steps member stands in instead of a refusal.

    Raises:
        RequestError: steps other than "auto", no deadline, or no member served here (422).
        DeadlineError: no member meets the deadline (429), or none has a live worker (503).
    """
    assert body.model is not None
    members = registry.series(body.model)
    names = [spec.name for spec in members]
    if body.steps != "auto":
        message = (
            f"model {body.model!r} is a series: ask for steps 'auto' with a deadline, or name "
            f"one of its models ({', '.join(names)})"
        )
        raise RequestError("steps", message, ["auto"])
    deadline_ms = body.deadline_ms or series_deadline(members)
    if deadline_ms is None:
        message = "steps 'auto' picks the steps that meet a deadline: give deadline_ms (ms)"
        raise RequestError("deadline_ms", message)
    candidates = [spec for spec in members if spec.name in served]
    if not candidates:
        message = f"no model of series {body.model!r} is served by this deployment"
        raise RequestError("model", message, list(served))
    chosen, prediction = candidates[-1], None  # no predictor: every member is cold
    if predictor is not None:
        workers = predictor.workers()
        predictions = [
            predictor.predict(spec.name, spec.default_steps, body.n, workers) for spec in candidates
        ]
        meeting = [
            (spec, p)
            for spec, p in zip(candidates, predictions, strict=True)
            if p.meets(deadline_ms, predictor.headroom)
        ]
        if meeting:
            chosen, prediction = meeting[-1]  # most steps: members are sorted by steps
        elif refuse:
            raise _refusal(predictions, deadline_ms, predictor.headroom)
        else:
            chosen = candidates[0]
    update = {"model": chosen.name, "steps": chosen.default_steps, "deadline_ms": deadline_ms}
    return body.model_copy(update=update), prediction
