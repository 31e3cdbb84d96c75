"""The registry (`/v1/models`), probes (`/healthz`, `/readyz`) and `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel

from hypersd.contracts import ErrorBody
from hypersd.recipes import format_steps
from hypersd.registry import format_size
from service.deps import ServicesDep
from service.errors import ApiError

router = APIRouter(tags=["system"])


class ModelInfo(BaseModel):
    """One registry entry, with whether a live worker serves it now (from heartbeats)."""

    id: str
    object: str = "model"
    owned_by: str = "hypersd"
    description: str
    family: str
    recipe: str
    backend: str
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


@router.get("/v1/models", response_model=ModelList)
def list_models(services: ServicesDep) -> ModelList:
    """The models this deployment knows (OpenAI's list shape, with sampling limits added)."""
    workers = services.store.workers()
    data = []
    for name in services.registry.names:
        spec = services.registry.get(name)
        recipe = spec.recipe_info
        serving = sum(1 for worker in workers if worker.model == name)
        data.append(
            ModelInfo(
                id=name,
                description=spec.description,
                family=spec.family,
                recipe=spec.recipe,
                backend=spec.backend,
                steps=format_steps(spec.steps),
                default_steps=spec.default_steps,
                sizes=[format_size(size) for size in spec.sizes],
                default_size=format_size(spec.default_size),
                guidance_scale=spec.guidance_scale,
                eta=recipe.eta,
                negative_prompt=recipe.negative_prompt,
                served=serving > 0,
                workers=serving,
            )
        )
    return ModelList(data=data)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
def readyz(services: ServicesDep) -> dict[str, str]:
    """Redis answers and every served model has a live worker (from heartbeats)."""
    if not services.store.ping():
        raise ApiError(503, "unavailable", "the job store (Redis) does not answer")
    live = {worker.model for worker in services.store.workers()}
    missing = [name for name in services.served if name not in live]
    if missing:
        raise ApiError(503, "unavailable", f"no live worker for: {', '.join(missing)}")
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: this process's series plus queue depth and finished jobs."""
    body = generate_latest(REGISTRY) + generate_latest(request.app.state.jobs_metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
