"""The wire format between clients, the gateway and the workers, as pydantic models.

`GenerateRequest` is what clients post; `resolve_request` checks it against the model registry
(without torch: the gateway image carries none) and turns it into a `JobRecord`, the job's state as
stored in Redis and read by both the gateway and the workers. `Job` is what clients read back, and
`ErrorBody` is the one error shape of every 4xx/5xx answer.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hypersd.recipes import format_steps
from hypersd.registry import ModelSpec, Registry, UnknownModelError, format_size

MAX_IMAGES = 8
# Image k of a job uses seed + k, so the first seed leaves room below 2**64 (the pipeline's limit).
MAX_SEED = 2**63 - 1

OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["url", "b64_json"]

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class JobStatus(StrEnum):
    """A job's life: queued -> running -> succeeded | failed; canceled or expired on the way."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class GenerateRequest(BaseModel):
    """The body of `POST /v1/generations`. Unset sampling values take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=1000)
    negative_prompt: str | None = Field(default=None, max_length=1000)
    model: str | None = Field(default=None, description="registry name; default: the default")
    steps: int | None = Field(default=None, ge=1, le=1000)
    width: int | None = Field(default=None, ge=8, le=4096)
    height: int | None = Field(default=None, ge=8, le=4096)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="default: random")
    guidance_scale: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    eta: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    output_format: OutputFormat = "png"
    response_format: ResponseFormat = "url"

    def fingerprint(self) -> str:
        """A digest of the body as sent, for `Idempotency-Key`: equal bodies, equal digests."""
        body = self.model_dump_json(exclude_unset=True)
        return hashlib.sha256(body.encode()).hexdigest()


class ErrorDetail(BaseModel):
    """What went wrong; `field` and `allowed` are set when one request value was refused."""

    type: str
    message: str
    field: str | None = None
    allowed: list[str] | None = None


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer (the same shape as OpenAI's, so its client reads it)."""

    error: ErrorDetail


class RequestError(ValueError):
    """A request value the registry's model does not allow (answered with 422)."""

    def __init__(self, field: str, message: str, allowed: list[str] | None = None) -> None:
        super().__init__(message)
        self.detail = ErrorDetail(
            type="invalid_request", message=message, field=field, allowed=allowed
        )


class JobRecord(BaseModel):
    """A job's stored state: the resolved request plus progress. Times are Unix seconds."""

    id: str
    status: JobStatus = JobStatus.QUEUED
    model: str
    prompt: str
    negative_prompt: str | None
    steps: int
    width: int
    height: int
    guidance_scale: float
    eta: float | None
    seeds: list[int]
    output_format: OutputFormat
    response_format: ResponseFormat
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    # the delivery that claimed the job: a claim retried after its reply was lost (Redis dropped
    # between the write and the answer) recognises its own write instead of skipping the job
    claim: str | None = None
    attempts: int = 0
    error: ErrorDetail | None = None
    timings: dict[str, float] = Field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]


def _sampling_field(message: str) -> str:
    """The field a registry/recipe error names first (`steps=3 is not...` -> `steps`)."""
    match = re.match(r"[a-z_]+", message)
    return match[0] if match else "body"


def _sampling_allowed(spec: ModelSpec, field: str) -> list[str] | None:
    recipe = spec.recipe_info
    if field == "steps":
        return [format_steps(spec.steps)]
    if field == "guidance_scale":
        low, high = recipe.guidance_range
        return [f"{low:g}" if low == high else f"{low:g} to {high:g}"]
    if field == "eta" and recipe.eta_range is not None:
        return [f"{recipe.eta_range[0]:g} to {recipe.eta_range[1]:g}"]
    return None


def resolve_request(request: GenerateRequest, registry: Registry) -> JobRecord:
    """Check a request against its model's registry entry and fill in the defaults.

    Raises:
        RequestError: naming the first refused field and its allowed values.
    """
    try:
        spec = registry.get(request.model)
    except UnknownModelError as error:
        raise RequestError("model", str(error), registry.names) from None
    try:
        width, height = spec.resolve_size(request.width, request.height)
    except ValueError as error:
        widths = {size[0] for size in spec.sizes}
        field = "width" if (request.width or spec.default_size[0]) not in widths else "height"
        raise RequestError(field, str(error), [format_size(s) for s in spec.sizes]) from None
    try:
        sampling = spec.resolve_sampling(
            request.steps,
            request.guidance_scale,
            request.eta,
            negative_prompt=bool(request.negative_prompt),
        )
    except ValueError as error:
        field = _sampling_field(str(error))
        raise RequestError(field, str(error), _sampling_allowed(spec, field)) from None
    seed = secrets.randbelow(MAX_SEED) if request.seed is None else request.seed
    return JobRecord(
        id=secrets.token_hex(12),
        model=spec.name,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=sampling.steps,
        width=width,
        height=height,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        seeds=[seed + k for k in range(request.n)],
        output_format=request.output_format,
        response_format=request.response_format,
        created_at=time.time(),
    )


class JobImage(BaseModel):
    """One image of a finished job: a URL or the bytes in base64, per `response_format`."""

    index: int
    seed: int
    content_type: str
    url: str | None = None
    b64_json: str | None = None


class Job(BaseModel):
    """What `GET /v1/generations/{id}` answers."""

    id: str
    object: Literal["generation"] = "generation"
    status: JobStatus
    model: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_seconds: float | None = Field(default=None, description="created -> started")
    run_seconds: float | None = Field(default=None, description="started -> finished")
    seeds: list[int]
    images: list[JobImage] = Field(default_factory=list)
    error: ErrorDetail | None = None
    links: dict[str, str]


def timestamp(seconds: float | None) -> datetime | None:
    """Unix seconds -> an aware UTC datetime (`None` stays `None`)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)
