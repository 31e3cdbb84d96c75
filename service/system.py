"""The registry (`/v1/models`), the workers (`/v1/workers`, admin), probes (`/healthz`,
`/readyz`) and `/metrics`; the probes and metrics need no API key (kubelet and Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field

from hypersd.recipes import format_steps
from hypersd.registry import format_size
from jobs.store import WorkerInfo
from service.auth import AdminDep, authenticate
from service.deps import Services, ServicesDep
from service.errors import COMMON, ApiError, errors

router = APIRouter(tags=["system"])


class ModelInfo(BaseModel):
    """One registry entry, with whether a live worker serves it now (from heartbeats)."""

    id: str
    object: str = "model"
    owned_by: str = "hypersd"
    description: str
    family: str
    recipe: str
    backend: str = Field(description="what live workers run (else what the registry asks for)")
    steps: str
    default_steps: int
    sizes: list[str]
    default_size: str
    guidance_scale: float
    eta: float | None
    negative_prompt: bool
    served: bool
    workers: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelInfo]


def _model_info(services: Services, name: str, workers: list[WorkerInfo]) -> ModelInfo:
    spec = services.registry.get(name)
    recipe = spec.recipe_info
    serving = [worker for worker in workers if worker.model == name]
    # What live workers run (a backend that failed to build falls back to eager), else what the
    # registry asks for.
    backends = sorted({worker.backend for worker in serving}) or [spec.backend]
    return ModelInfo(
        id=name,
        description=spec.description,
        family=spec.family,
        recipe=spec.recipe,
        backend=", ".join(backends),
        steps=format_steps(spec.steps),
        default_steps=spec.default_steps,
        sizes=[format_size(size) for size in spec.sizes],
        default_size=format_size(spec.default_size),
        guidance_scale=spec.guidance_scale,
        eta=recipe.eta,
        negative_prompt=recipe.negative_prompt,
        served=bool(serving),
        workers=len(serving),
    )


_AUTHENTICATED = [Depends(authenticate)]


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=errors(401, *COMMON),
    dependencies=_AUTHENTICATED,
)
def list_models(services: ServicesDep) -> ModelList:
    """The models this deployment knows (OpenAI's list shape, with sampling limits added)."""
    workers = services.store.workers()
    return ModelList(
        data=[_model_info(services, name, workers) for name in services.registry.names]
    )


@router.get(
    "/v1/models/{model_id}",
    response_model=ModelInfo,
    responses=errors(401, 404, 422, *COMMON),
    dependencies=_AUTHENTICATED,
)
def get_model(model_id: str, services: ServicesDep) -> ModelInfo:
    """One model, as `GET /v1/models` lists it (OpenAI's `models.retrieve`)."""
    if model_id not in services.registry.names:
        shown = model_id if len(model_id) <= 64 else f"{model_id[:64]}..."
        raise ApiError(404, "not_found", f"no model {shown!r}")
    return _model_info(services, model_id, services.store.workers())


class WorkerList(BaseModel):
    object: str = "list"
    data: list[WorkerInfo]


@router.get("/v1/workers", response_model=WorkerList, responses=errors(401, 403, *COMMON))
def list_workers(services: ServicesDep, admin: AdminDep) -> WorkerList:
    """The live workers (from heartbeats): model, backend, task slots and how many are busy."""
    return WorkerList(data=services.store.workers())


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", responses=errors(*COMMON))
def readyz(services: ServicesDep) -> dict[str, str]:
    """Ready when what the gateway itself needs answers: the job store (Redis).

    Not whether workers are up: with workers scaled to zero on their queue (KEDA), a gateway that
    waited for them would get no traffic, so no queue, so no workers. Which models have live
    workers is in `GET /v1/models` (`workers`) and the `hypersd_workers` metric.
    """
    if not services.store.ping():
        raise ApiError(503, "unavailable", "the job store (Redis) does not answer")
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: this process's series plus queue depth and finished jobs."""
    body = generate_latest(REGISTRY) + generate_latest(request.app.state.jobs_metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
