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
) -> JobRecord:
    """Validate, store and enqueue a job; a known idempotency key returns its job instead (and
    publishes it again while it is still queued). Blocking (Redis): async routes call it in a
    thread.

    ``served`` are the models this deployment runs workers for: a job for another registry
    model would wait for a worker that never comes (embedded mode holds one model). A request
    naming no model gets ``default_model`` (when None, the registry's default).
    ``owner`` (the caller's API key name; None with auth off) owns the job and scopes
    idempotency keys, so one client's key never returns another's job.
    ``quotas`` are the settings whose limits a new job must pass (`service.quotas.admit`).

    Raises:
        RequestError: a value the model does not allow, or a model not served here (422).
        ApiError: 409 when the idempotency key was used with another body; 429 past a quota.
    """
    # the body as sent (before the default model is filled in) is what a retry repeats
    fingerprint = body.fingerprint()
    if body.model is None and default_model is not None:
        body = body.model_copy(update={"model": default_model})
    record = resolve_request(body, registry).model_copy(update={"owner": owner})
    if record.model not in served:
        raise RequestError(
            "model", f"model {record.model!r} is not served by this deployment", list(served)
        )
    scoped = None
    if idempotency_key is not None:
        scoped = hashlib.sha256(f"{owner or ''}\n{idempotency_key}".encode()).hexdigest()
    idempotency = None if scoped is None else (scoped, fingerprint)
    # A retry of a known job makes no new one, so no quota refuses it: a client retrying after a
    # 504 while its job is in flight gets that job, not a 429.
    if quotas is not None and (scoped is None or store.idempotent_job(scoped) is None):
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
    quotas): what the native and the OpenAI routes both do."""
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
    )


async def wait(store: JobStore, job_id: str, timeout_s: float) -> JobRecord | None:
    """The job once it is finished, or as it is after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    # Watch before the first read, so an end between the read and the wait is not missed.
    with store.watch(job_id) as ended:
        while True:
            ended.clear()
            record = await anyio.to_thread.run_sync(store.get, job_id)
            remaining = deadline - time.monotonic()
            if record is None or record.status.terminal or remaining <= 0:
                return record
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), min(remaining, _RECHECK_S))


def prefer_wait(prefer: str | None, cap_s: float) -> float | None:
    """Seconds asked for by `Prefer: wait=N` (capped), or None without one."""
    match = _PREFER_WAIT.search(prefer or "")
    return None if match is None else min(float(match[1]), cap_s)


def to_job(
    record: JobRecord, store: JobStore, public_url: str | None, ttl_s: int, images: bool = True
) -> Job:
    """The client's view of a job; images as URLs or base64, per `response_format`.

    URLs start with `public_url` (the deployment's configured address) or are relative: never
    built from the request's `Host` header, which the client controls. Blocking (base64 images
    are read from the store); `images=False` leaves them out (a list of jobs).
    """
    base = f"{(public_url or '').rstrip('/')}/v1/generations/{record.id}"
    status = public_status(record, ttl_s)
    shown = []
    if images and status == JobStatus.SUCCEEDED:
        for index, seed in enumerate(record.seeds):
            image = JobImage(index=index, seed=seed, content_type=record.content_type)
            if record.response_format == "url":
                image.url = f"{base}/images/{index}"
            else:
                data = store.get_image(record.id, index) or b""
                image.b64_json = base64.b64encode(data).decode()
            shown.append(image)
    started, finished = record.started_at, record.finished_at
    return Job(
        id=record.id,
        status=status,
        model=record.model,
        created_at=datetime.fromtimestamp(record.created_at, UTC),
        started_at=timestamp(started),
        finished_at=timestamp(finished),
        queue_seconds=None if started is None else started - record.created_at,
        run_seconds=None if started is None or finished is None else finished - started,
        seeds=record.seeds,
        images=shown,
        error=record.error,
        links={"self": base, "cancel": f"{base}/cancel"},
    )
