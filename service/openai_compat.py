"""`POST /v1/images/generations`, OpenAI-compatible and synchronous (the `openai` client works)."""

from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hypersd.contracts import (
    MAX_IMAGES,
    ErrorBody,
    GenerateRequest,
    JobStatus,
    OutputFormat,
    RequestError,
)
from service import job_service
from service.deps import QueueDep, RegistryDep, ServicesDep, SettingsDep, StoreDep
from service.errors import ApiError

router = APIRouter(tags=["openai"])


class ImagesRequest(BaseModel):
    """OpenAI's image request; fields this service does not use (quality, style...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=1000)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(default=None, description='"WxH"; default: the model\'s')
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormat | None = None


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
    responses={code: {"model": ErrorBody} for code in (409, 422, 500, 504)},
)
async def create_images(
    body: ImagesRequest,
    request: Request,
    registry: RegistryDep,
    store: StoreDep,
    queue: QueueDep,
    settings: SettingsDep,
    services: ServicesDep,
) -> ImagesResponse:
    """Generate and wait: the images as URLs (default) or base64."""
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
        record = job_service.submit(
            generate, registry=registry, store=store, queue=queue, served=services.served
        )
    except ValidationError as error:  # a size out of every model's range
        raise RequestError("size", f"size {body.size!r}: {error.errors()[0]['msg']}") from None
    except RequestError as error:  # OpenAI's request names one size, not width and height
        if error.detail.field in ("width", "height"):
            error.detail.field = "size"
        raise
    record = await job_service.wait(store, record.id, settings.sync_timeout_s) or record
    if record.status == JobStatus.FAILED and record.error is not None:
        raise ApiError(500, record.error.type, record.error.message)
    if record.status != JobStatus.SUCCEEDED:
        raise ApiError(504, "timeout", f"job {record.id} is {record.status}; poll its status")
    job = job_service.to_job(record, store, str(request.base_url), settings.job_ttl_s)
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageData(url=image.url, b64_json=image.b64_json) for image in job.images],
    )
