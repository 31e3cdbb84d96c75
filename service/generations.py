"""`/v1/generations`: submit (or wait with `Prefer: wait=N`), read, cancel, image bytes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response

from hypersd.contracts import ErrorBody, GenerateRequest, Job, JobStatus
from jobs import states
from jobs.record import JobRecord
from service import job_service
from service.deps import QueueDep, RegistryDep, ServicesDep, SettingsDep, StoreDep
from service.errors import ApiError

router = APIRouter(prefix="/v1/generations", tags=["generations"])

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (404, 409, 422, 500)
}


def _get(store: StoreDep, job_id: str) -> JobRecord:
    record = store.get(job_id)
    if record is None:
        raise ApiError(404, "not_found", f"no job {job_id!r} (unknown, or expired)")
    return record


@router.post("", status_code=202, response_model=Job, responses=_ERRORS)
async def create_generation(
    body: GenerateRequest,
    request: Request,
    response: Response,
    registry: RegistryDep,
    store: StoreDep,
    queue: QueueDep,
    settings: SettingsDep,
    services: ServicesDep,
    prefer: Annotated[str | None, Header(description="`wait=N`: hold up to N seconds")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Job:
    """Queue a job: 202 with its id; with `Prefer: wait=N`, 200 with the job if it ends in time.

    The same `Idempotency-Key` with the same body gives back the same job; with another, 409.
    """
    record = job_service.submit(
        body,
        registry=registry,
        store=store,
        queue=queue,
        served=services.served,
        idempotency_key=idempotency_key,
    )
    wait_s = job_service.prefer_wait(prefer, settings.max_prefer_wait_s)
    if wait_s is not None:
        record = await job_service.wait(store, record.id, wait_s) or record
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    if record.status.terminal:
        response.status_code = 200
    response.headers["Location"] = f"/v1/generations/{record.id}"
    return job_service.to_job(record, store, str(request.base_url), settings.job_ttl_s)


@router.get("/{job_id}", response_model=Job, responses=_ERRORS)
def get_generation(job_id: str, request: Request, store: StoreDep, settings: SettingsDep) -> Job:
    """The job's status, timings, seeds, images (when succeeded) and error (when failed)."""
    return job_service.to_job(_get(store, job_id), store, str(request.base_url), settings.job_ttl_s)


@router.post("/{job_id}/cancel", response_model=Job, responses=_ERRORS)
def cancel_generation(job_id: str, request: Request, store: StoreDep, settings: SettingsDep) -> Job:
    """A queued job never runs; a running one is marked canceled and its result discarded."""

    record = store.update(job_id, states.cancel)
    if record is None:
        status = _get(store, job_id).status
        raise ApiError(409, "conflict", f"job {job_id!r} is already {status}")
    return job_service.to_job(record, store, str(request.base_url), settings.job_ttl_s)


@router.get(
    "/{job_id}/images/{index}",
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, **_ERRORS},
    response_class=Response,
)
def get_image(job_id: str, index: int, store: StoreDep, settings: SettingsDep) -> Response:
    """Image `index` of a succeeded job, as stored (PNG, JPEG or WebP)."""
    record = _get(store, job_id)
    if states.public_status(record, settings.job_ttl_s) != JobStatus.SUCCEEDED:
        raise ApiError(404, "not_found", f"job {job_id!r} has no images: it is {record.status}")
    data = store.get_image(job_id, index) if 0 <= index < len(record.seeds) else None
    if data is None:
        raise ApiError(404, "not_found", f"job {job_id!r} has no image {index}")
    return Response(data, media_type=record.content_type)
