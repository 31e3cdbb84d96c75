"""Job logic shared by the routes: submit (with idempotency), wait, and the public view."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import time
from collections.abc import Collection
from datetime import UTC, datetime

import anyio

from hypersd.contracts import GenerateRequest, Job, JobImage, JobStatus, RequestError, timestamp
from hypersd.registry import Registry
from jobs.queue import JobQueue
from jobs.record import JobRecord, resolve_request
from jobs.settings import Settings
from jobs.states import public_status
from jobs.store import IdempotencyConflict, JobStore
from jobs.webhooks import check_url
from service.admission import Predictor, check_deadline, choose_in_series
from service.deps import Services
from service.errors import ApiError
from service.metrics import JOBS_SUBMITTED
from service.quotas import admit

# A waiting request is woken by the job's end (`JobStore.watch`); it re-reads the job this often
# anyway, so that a missed notice delays the answer by at most this much.
_RECHECK_S = 1.0
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def submit(
    body: GenerateRequest,
    *,
    registry: Registry,
    store: JobStore,
    queue: JobQueue,
    served: Collection[str],
    default_model: str | None = None,
    idempotency_key: str | None = None,
    owner: str | None = None,
    quotas: Settings | None = None,
    predictor: Predictor | None = None,
) -> JobRecord:
    """Validate, store and enqueue a job; a known idempotency key returns its job instead (and
    publishes it again while it is still queued). Blocking (Redis): async routes call it in a
    thread.

    ``served`` are the models this deployment runs workers for: a job for another registry
    model would wait for a worker that never comes (embedded mode holds one model). A request
    naming no model gets ``default_model`` (when None, the registry's default).
    ``owner`` (the caller's API key name; None with auth off) owns the job and scopes
    idempotency keys, so one client's key never returns another's job.
    ``quotas`` are the settings whose limits a new job must pass (`service.quotas.admit`), and
    whose webhook allow-list a `webhook` must pass (`jobs.webhooks.check_url`; None: refused).
    ``predictor`` predicts a new job's finish for SLA admission (`service.admission`): a job
    with a deadline (`deadline_ms`, else its model's `sla_ms`) predicted to miss it is refused,
    and a series with `"steps": "auto"` gets the member with the most steps that meets it.
    None: no job is refused for its deadline, and a series gets its most steps.

    Raises:
        RequestError: a value the model does not allow, a model not served here, or a webhook
            URL not allowed (422).
        ApiError: 409 when the idempotency key was used with another body; 429 past a quota or
            a deadline; 503 with a deadline and no live worker for the model.
    """
    # the body as sent (before the default model is filled in) is what a retry repeats
    fingerprint = body.fingerprint()
    if body.model is None and default_model is not None:
        body = body.model_copy(update={"model": default_model})
    scoped = None
    if idempotency_key is not None:
        scoped = hashlib.sha256(f"{owner or ''}\n{idempotency_key}".encode()).hexdigest()
    idempotency = None if scoped is None else (scoped, fingerprint)
    # A retry of a known job makes no new one, so neither a quota nor a deadline refuses it: a
    # client retrying after a 504 while its job is in flight gets that job, not a 429.
    new = scoped is None or store.idempotent_job(scoped) is None
    series, prediction = None, None
    if body.model is not None and registry.series(body.model):
        series = body.model
        body, prediction = choose_in_series(body, registry, served, predictor, refuse=new)
    record = resolve_request(body, registry).model_copy(update={"owner": owner})
    if body.webhook is not None:
        try:
            check_url(body.webhook, quotas.webhook_hosts if quotas is not None else ())
        except ValueError as error:
            raise RequestError("webhook", str(error)) from None
        record = record.model_copy(update={"webhook": body.webhook})
    if record.model not in served:
        raise RequestError(
            "model", f"model {record.model!r} is not served by this deployment", list(served)
        )
    spec = registry.get(record.model)
    deadline_ms = body.deadline_ms or spec.sla_ms
    if new and predictor is not None and series is None and deadline_ms is not None:
        prediction = check_deadline(predictor, spec, record.steps, len(record.seeds), deadline_ms)
    seconds = None if prediction is None else prediction.seconds
    record = record.model_copy(
        update={"series": series, "deadline_ms": deadline_ms, "predicted_s": seconds}
    )
    if quotas is not None and new:
        admit(quotas, store, queue, owner, record.model)
    try:
        stored = store.create(record, idempotency)
    except IdempotencyConflict:
        raise ApiError(
            409, "idempotency_conflict", "Idempotency-Key was already used with another body"
        ) from None
    if stored.id == record.id:
        queue.submit(record)
        JOBS_SUBMITTED.labels(record.model).inc()
    elif stored.status == JobStatus.QUEUED:
        # A retry of a job that is still queued publishes it again: the first publish may have
        # failed after the job was stored (the client got a 503 and retried), and then no worker
        # would ever see it. A second message is harmless: the worker's claim (queued -> running)
        # lets only one delivery run the job.
        queue.submit(stored)
    return stored


def submit_for(
    services: Services,
    body: GenerateRequest,
    *,
    owner: str | None,
    idempotency_key: str | None,
) -> JobRecord:
    """`submit` on this deployment (its registry, store, queue, served and default models,
    quotas, SLA admission): what the native and the OpenAI routes both do."""
    return submit(
        body,
        registry=services.registry,
        store=services.store,
        queue=services.queue,
        served=services.served,
        default_model=services.default_model,
        idempotency_key=idempotency_key,
        owner=owner,
        quotas=services.settings,
        predictor=services.predictor,
    )


async def wait(store: JobStore, job_id: str, timeout_s: float) -> JobRecord | None:
    """The job once it is finished, or as it is after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    # Watch before the first read, so an end between the read and the wait is not missed.
    with store.watch(job_id) as watch:
        while True:
            watch.ended.clear()
            record = await anyio.to_thread.run_sync(store.get, job_id)
            remaining = deadline - time.monotonic()
            if record is None or record.status.terminal or remaining <= 0:
                return record
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.ended.wait(), min(remaining, _RECHECK_S))
            if watch.record is not None:  # the notice carried the ended job: no read needed
                return watch.record


def prefer_wait(prefer: str | None, cap_s: float) -> float | None:
    """Seconds asked for by `Prefer: wait=N` (capped), or None without one."""
    match = _PREFER_WAIT.search(prefer or "")
    return None if match is None else min(float(match[1]), cap_s)


async def to_job_async(
    record: JobRecord, store: JobStore, public_url: str | None, ttl_s: int
) -> Job:
    """`to_job` for an async route: in the thread pool when it reads the store (`store_reads`),
    else on the event loop, since a hop to the thread pool costs more than building the view."""
    if store_reads(record, public_status(record, ttl_s)):
        return await anyio.to_thread.run_sync(to_job, record, store, public_url, ttl_s)
    return to_job(record, store, public_url, ttl_s)


def store_reads(
    record: JobRecord, status: JobStatus, images: bool = True, progress: bool = True
) -> frozenset[str]:
    """What `to_job` reads from the store for a job in `status`: `"images"` (base64 images of a
    finished job), `"position"` (a queued job's place in line) or `"step"` (a running job's)."""
    reads = set()
    if images and status == JobStatus.SUCCEEDED and record.response_format == "b64_json":
        reads.add("images")
    if progress and status == JobStatus.QUEUED:
        reads.add("position")
    if progress and status == JobStatus.RUNNING:
        reads.add("step")
    return frozenset(reads)


def to_job(
    record: JobRecord,
    store: JobStore,
    public_url: str | None,
    ttl_s: int,
    images: bool = True,
    progress: bool = True,
) -> Job:
    """The client's view of a job; images as URLs or base64, per `response_format`.

    URLs start with `public_url` (the deployment's configured address) or are relative: never
    built from the request's `Host` header, which the client controls. Blocking (base64 images
    are read from the store); `images=False` leaves them out (a list of jobs), and
    `progress=False` the queue position and step (a read each).
    """
    base = f"{(public_url or '').rstrip('/')}/v1/generations/{record.id}"
    status = public_status(record, ttl_s)
    reads = store_reads(record, status, images, progress)
    shown = []
    if images and status == JobStatus.SUCCEEDED:
        for index, seed in enumerate(record.seeds):
            image = JobImage(index=index, seed=seed, content_type=record.content_type)
            if "images" in reads:
                data = store.get_image(record.id, index) or b""
                image.b64_json = base64.b64encode(data).decode()
            else:
                image.url = f"{base}/images/{index}"
            shown.append(image)
    position = store.queue_position(record) if "position" in reads else None
    step = (store.progress(record.id) or 0) if "step" in reads else None
    started, finished = record.started_at, record.finished_at
    return Job(
        id=record.id,
        status=status,
        model=record.model,
        steps=record.steps,
        series=record.series,
        deadline_ms=record.deadline_ms,
        predicted_seconds=record.predicted_s,
        created_at=datetime.fromtimestamp(record.created_at, UTC),
        started_at=timestamp(started),
        finished_at=timestamp(finished),
        queue_seconds=None if started is None else started - record.created_at,
        run_seconds=None if started is None or finished is None else finished - started,
        seeds=record.seeds,
        images=shown,
        error=record.error,
        queue_position=position,
        step=step,
        links={"self": base, "cancel": f"{base}/cancel"},
    )
