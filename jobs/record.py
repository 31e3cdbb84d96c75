"""The job record: a request resolved against the registry, as the job store keeps it.

`resolve_request` checks a client's `GenerateRequest` against its model's registry entry (without
torch: the gateway carries none) and fills in the defaults; the result, a `JobRecord`, is the job's
state as stored in Redis (or in memory) and read by both the gateway and the workers. How a record
may change is `jobs.states`.
"""

from __future__ import annotations

import re
import secrets
import time

from pydantic import BaseModel, Field

from hypersd.contracts import (
    CONTENT_TYPES,
    MAX_SEED,
    ErrorDetail,
    GenerateRequest,
    JobStatus,
    OutputFormat,
    RequestError,
    ResponseFormat,
)
from hypersd.recipes import format_steps
from hypersd.registry import ModelSpec, Registry, UnknownModelError, format_size


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
    # the name of the API key that made the job (None: made with auth off); only it reads the job
    owner: str | None = None
    error: ErrorDetail | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    # SLA admission (`service.admission`): the series a `"steps": "auto"` request named, the
    # deadline the job was admitted for, and its predicted finish then (seconds from creation)
    series: str | None = None
    deadline_ms: float | None = None
    predicted_s: float | None = None
    # where the job's end is POSTed (`jobs.webhooks`), checked against the allow-list at submit
    webhook: str | None = None

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
    if request.steps == "auto":  # a series' job arrives here with its member's steps
        series = ", ".join(registry.series_names) or "none in this registry"
        message = (
            f"steps 'auto' picks a model of a series ({series}) by deadline: name the series as "
            f"the model instead of {spec.name!r}, or give steps"
        )
        raise RequestError("steps", message, [format_steps(spec.steps)])
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
    # a random first seed leaves room for the job's n seeds within 0..MAX_SEED
    seed = secrets.randbelow(MAX_SEED - request.n + 2) if request.seed is None else request.seed
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
