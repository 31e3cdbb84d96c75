"""`/v1/generations`: submit (or wait with `Prefer: wait=N`), read, cancel, image bytes."""

from __future__ import annotations

import hashlib
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from hypersd.contracts import GenerateRequest, Job, JobList, JobStatus, RequestError
from jobs import states
from jobs.record import JobRecord
from service import job_service
from service.auth import CallerDep, authenticate
from service.deps import ServicesDep, SettingsDep, StoreDep
from service.errors import BODY, COMMON, ApiError, errors

router = APIRouter(
    prefix="/v1/generations", tags=["generations"], dependencies=[Depends(authenticate)]
)

_READ = errors(401, 404, 422, *COMMON)


def _shown(job_id: str) -> str:
    """A job id as an error message shows it: a client's 10 KB id is not echoed back whole."""
    return repr(job_id) if len(job_id) <= 64 else f"{job_id[:64]!r}..."


def get_job(store: StoreDep, job_id: str, caller: CallerDep) -> JobRecord:
    """The caller's job; another client's is as unknown as a missing one (ids cannot be probed)."""
    record = store.get(job_id)
    if record is None or not caller.owns(record):
        raise ApiError(404, "not_found", f"no job {_shown(job_id)} (unknown, or expired)")
    return record


@router.post(
    "",
    status_code=202,
    response_model=Job,
    responses={
        200: {"model": Job, "description": "The job ended within `Prefer: wait`, or a replay"},
        **errors(*BODY, 401, 409, 429, *COMMON),
    },
)
async def create_generation(
    body: GenerateRequest,
    response: Response,
    caller: CallerDep,
    store: StoreDep,
    settings: SettingsDep,
    services: ServicesDep,
    prefer: Annotated[str | None, Header(description="`wait=N`: hold up to N seconds")] = None,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> Job:
    """Queue a job: 202 with its id; with `Prefer: wait=N`, 200 with the job if it ends in time.

    The same `Idempotency-Key` with the same body gives back the same job (200 once it ended);
    with another body, 409.
    """
    record = await run_in_threadpool(
        job_service.submit_for,
        services,
        body,
        owner=caller.name,
        idempotency_key=idempotency_key,
    )
    wait_s = job_service.prefer_wait(prefer, settings.max_prefer_wait_s)
    if wait_s is not None:
        record = await job_service.wait(store, record.id, wait_s) or record
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    if record.status.terminal:
        response.status_code = 200
    response.headers["Location"] = f"/v1/generations/{record.id}"
    return await job_service.to_job_async(record, store, settings.public_url, settings.job_ttl_s)


@router.get("", response_model=JobList, responses=errors(401, 422, *COMMON))
def list_generations(
    caller: CallerDep,
    store: StoreDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="the last id seen")] = None,
) -> JobList:
    """The caller's jobs, newest first, without their images; page on with `after=last_id`."""
    try:
        records, more = store.list_jobs(caller.name, limit, after)
    except KeyError:
        raise RequestError(
            "after", f"no job {_shown(after or '')} of yours to list after"
        ) from None
    jobs = [
        job_service.to_job(
            record, store, settings.public_url, settings.job_ttl_s, images=False, progress=False
        )
        for record in records
    ]
    return JobList(data=jobs, has_more=more, last_id=jobs[-1].id if jobs else None)


@router.get("/{job_id}", response_model=Job, responses=_READ)
def get_generation(job_id: str, caller: CallerDep, store: StoreDep, settings: SettingsDep) -> Job:
    """The job's status, timings, seeds, images (when succeeded) and error (when failed)."""
    record = get_job(store, job_id, caller)
    return job_service.to_job(record, store, settings.public_url, settings.job_ttl_s)


@router.post("/{job_id}/cancel", response_model=Job, responses=errors(401, 404, 409, 422, *COMMON))
def cancel_generation(
    job_id: str, caller: CallerDep, store: StoreDep, settings: SettingsDep
) -> Job:
    """A queued job never runs; a running one is marked canceled and its result discarded."""
    get_job(store, job_id, caller)  # the caller's job (its owner never changes)
    record = store.update(job_id, states.cancel)
    if record is None:
        status = get_job(store, job_id, caller).status
        raise ApiError(409, "conflict", f"job {_shown(job_id)} is already {status}")
    return job_service.to_job(record, store, settings.public_url, settings.job_ttl_s)


# An image index is digits only: `1.0` or `+1` name no image (an int path parameter would take
# them as 1).
ImageIndex = Annotated[str, Path(pattern=r"^[0-9]{1,3}$", description="0 to n - 1")]


def _not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether `If-None-Match` names `etag` (or is `*`); weak comparison, as RFC 9110 asks."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get(
    "/{job_id}/images/{index}",
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        304: {"description": "Not modified: `If-None-Match` names the image's `ETag`"},
        **_READ,
    },
    response_class=Response,
)
def get_image(
    job_id: str,
    index: ImageIndex,
    caller: CallerDep,
    store: StoreDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """Image `index` of a succeeded job, as stored (PNG, JPEG or WebP).

    An image never changes: a strong `ETag` (its SHA-256) and `Cache-Control: private` (it is
    the caller's) for as long as it is kept; `If-None-Match` with its tag gives a 304.
    """
    record = get_job(store, job_id, caller)
    if states.public_status(record, settings.job_ttl_s) != JobStatus.SUCCEEDED:
        message = f"job {_shown(job_id)} has no images: it is {record.status}"
        raise ApiError(404, "not_found", message)
    number = int(index)
    data = store.get_image(job_id, number) if number < len(record.seeds) else None
    if data is None:
        raise ApiError(404, "not_found", f"job {_shown(job_id)} has no image {number}")
    kept_s = (record.finished_at or time.time()) + settings.job_ttl_s - time.time()
    headers = {
        "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
        "Cache-Control": f"private, max-age={max(0, int(kept_s))}",
    }
    if _not_modified(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=record.content_type, headers=headers)
