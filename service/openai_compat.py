"""`POST /v1/images/generations`, OpenAI-compatible and synchronous (the `openai` client works).

Errors follow OpenAI's shape and codes (`service.errors`: 400 with `param` and `code`), and an
`Idempotency-Key` (which the `openai` client sends on its retries when given one) makes a retry
after a 504 wait for the same job instead of queueing another; the 504 names the job
(`error.job_id`) so a client can poll it.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from hypersd.contracts import (
    MAX_IMAGES,
    GenerateRequest,
    JobStatus,
    OutputFormat,
    RequestError,
)
from service import job_service
from service.auth import CallerDep, authenticate
from service.deps import ServicesDep, SettingsDep, StoreDep
from service.errors import BODY, COMMON, ApiError, errors

router = APIRouter(tags=["openai"], dependencies=[Depends(authenticate)])


class ImagesRequest(BaseModel):
    """OpenAI's image request; fields this service does not use (quality, style...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=1000)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, strict=True)
    size: str | None = Field(default=None, description='"WxH"; default: the model\'s')
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormat | None = None
    stream: bool = Field(default=False, description="not supported: must be false")


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=errors(*BODY, 401, 409, 429, *COMMON, 504),
)
async def create_images(
    body: ImagesRequest,
    caller: CallerDep,
    store: StoreDep,
    settings: SettingsDep,
    services: ServicesDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> ImagesResponse:
    """Generate and wait: the images as URLs (default) or base64.

    A 504 (the job did not end within the sync timeout) names the job in `error.job_id`; a retry
    with the same `Idempotency-Key` waits for that job again.
    """
    if body.stream:  # the client would read an empty stream: refuse instead
        raise RequestError("stream", "streaming is not supported: send stream=false")
    width = height = None
    if body.size is not None and body.size != "auto":
        match = re.fullmatch(r"(\d+)x(\d+)", body.size)
        if match is None:
            raise RequestError("size", f"size must be 'WxH', got {body.size!r}")
        width, height = int(match[1]), int(match[2])
    try:
        generate = GenerateRequest(
            prompt=body.prompt,
            model=body.model,
            n=body.n,
            width=width,
            height=height,
            response_format=body.response_format or "url",
            output_format=body.output_format or "png",
        )
        record = await run_in_threadpool(
            job_service.submit_for,
            services,
            generate,
            owner=caller.name,
            idempotency_key=idempotency_key,
        )
    except ValidationError as error:  # a size out of every model's range
        raise RequestError("size", f"size {body.size!r}: {error.errors()[0]['msg']}") from None
    except RequestError as error:  # OpenAI's request names one size, not width and height
        if error.detail.field in ("width", "height"):
            error.detail.field = "size"
        raise
    record = await job_service.wait(store, record.id, settings.sync_timeout_s) or record
    if record.status == JobStatus.FAILED and record.error is not None:
        raise ApiError(500, record.error.type, record.error.message, job_id=record.id)
    if record.status != JobStatus.SUCCEEDED:
        message = f"job {record.id} is {record.status}; poll GET /v1/generations/{record.id}"
        raise ApiError(504, "timeout", message, job_id=record.id)
    job = await job_service.to_job_async(record, store, settings.public_url, settings.job_ttl_s)
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageData(url=image.url, b64_json=image.b64_json) for image in job.images],
    )
