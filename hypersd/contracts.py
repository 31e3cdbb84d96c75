"""The wire format between clients and the gateway, as pydantic models (no torch).

`GenerateRequest` is what clients post (`jobs.record.resolve_request` checks it against the model
registry and turns it into the stored job record), `Job` is what clients read back, and `ErrorBody`
is the one error shape of every 4xx/5xx answer.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

MAX_IMAGES = 8
# Seeds are 0..2**53 - 1, the integers a JavaScript number (and any JSON parser using doubles)
# holds exactly, so a client can send back any seed it was given. Image k of a job uses seed + k,
# so a request's seed + n - 1 must be in the range too.
MAX_SEED = 2**53 - 1

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

    # strict: `"n": true` or `"steps": 2.0` are refused rather than read as 1 and 2
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=1000)
    negative_prompt: str | None = Field(default=None, max_length=1000)
    model: str | None = Field(default=None, description="registry name; default: the default")
    steps: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] | None = Field(
        default=None,
        description='"auto" with a series as the model: the member with the most steps '
        "predicted to finish within the deadline",
    )
    width: int | None = Field(default=None, ge=8, le=4096)
    height: int | None = Field(default=None, ge=8, le=4096)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="image k uses seed + k; seed + n - 1 must not pass 2^53 - 1; default: random",
    )
    # floats stay lax: JSON has one number type, and `"guidance_scale": 1` means 1.0
    guidance_scale: float | None = Field(
        default=None, ge=0, le=100, allow_inf_nan=False, strict=False
    )
    eta: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False, strict=False)
    output_format: OutputFormat = "png"
    response_format: ResponseFormat = "url"
    deadline_ms: float | None = Field(
        default=None,
        gt=0,
        le=86_400_000,
        allow_inf_nan=False,
        strict=False,
        description="finish within this many ms of submission, or be refused at once (429 with "
        "the predicted wait); default: the model's `sla_ms`, if any",
    )
    webhook: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="http(s) URL POSTed the job (signed, `X-Hypersd-Signature`) when it ends; "
        "its host must be on the deployment's allow-list",
    )

    @field_validator("steps", mode="wrap")
    @classmethod
    def _steps_error(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """One error naming `steps`, not one per member of the union (`steps.constrained-int`)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('steps is an integer from 1 to 1000, or "auto"') from None

    @field_validator("seed")
    @classmethod
    def _last_seed_in_range(cls, seed: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)  # `n` is checked first (declared before `seed`)
        if seed is not None and seed + n - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must be at most {MAX_SEED} (2^53 - 1)")
        return seed

    def fingerprint(self) -> str:
        """A digest of the body as sent, for `Idempotency-Key`: equal bodies, equal digests."""
        body = self.model_dump_json(exclude_unset=True)
        return hashlib.sha256(body.encode()).hexdigest()


class ErrorDetail(BaseModel):
    """What went wrong; `field` and `allowed` are set when one request value was refused.

    `param` and `code` are OpenAI's names, set on the OpenAI-compatible route (where `param` is
    `field`), so its client's `error.param` and `error.code` read them; `job_id` names the job an
    error is about when the request made one (e.g. a synchronous request that timed out).
    """

    type: str
    message: str
    field: str | None = None
    allowed: list[str] | None = None
    param: str | None = None
    code: str | None = None
    job_id: str | None = None
    predicted_ms: float | None = Field(
        default=None, description="a refused deadline: the predicted time to finish"
    )
    deadline_ms: float | None = Field(default=None, description="a refused deadline: the deadline")


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
    steps: int
    series: str | None = Field(default=None, description='the series asked for `"steps": "auto"`')
    deadline_ms: float | None = Field(default=None, description="the deadline it was admitted for")
    predicted_seconds: float | None = Field(
        default=None, description="its predicted finish at admission (a model with a deadline)"
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_seconds: float | None = Field(default=None, description="created -> started")
    run_seconds: float | None = Field(default=None, description="started -> finished")
    seeds: list[int]
    images: list[JobImage] = Field(default_factory=list)
    error: ErrorDetail | None = None
    queue_position: int | None = Field(
        default=None, description="while queued: jobs for its model ahead of it (0: next)"
    )
    step: int | None = Field(
        default=None, description="while running: denoising steps done (of `steps`)"
    )
    links: dict[str, str]


class JobList(BaseModel):
    """What `GET /v1/generations` answers: a page of the caller's jobs, newest first (OpenAI's
    list shape). Jobs are listed without their images: read a job for them."""

    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    last_id: str | None = Field(default=None, description="the next page's `after`")


def timestamp(seconds: float | None) -> datetime | None:
    """Unix seconds -> an aware UTC datetime (`None` stays `None`)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)
