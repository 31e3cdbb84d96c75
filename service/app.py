"""The FastAPI app: `create_app(settings)` wires the job store, the queue and the routes.

By default the gateway only enqueues: jobs go to Celery workers on Redis (`REDIS_URL`), and job
state and images are read back from Redis. Whatever provides the job store and the queue is a
parameter (`services`), so embedded mode (`launcher.embedded`) can serve the same routes with the
model running in this process, without this package importing the worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import redis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from hypersd.registry import Registry, load_registry
from jobs.queue import CeleryQueue, create_celery
from jobs.record import JobRecord
from jobs.redis_store import RedisJobStore
from jobs.service_time import RedisServiceTimes
from jobs.settings import Settings
from jobs.webhooks import WebhookSender
from service import errors, events, generations, job_service, openai_compat, page, system
from service.deps import Services
from service.limits import BodyLimits
from service.metrics import JobsCollector, RequestMetrics
from service.request_id import RequestId

ServicesFactory = Callable[[Settings, Registry], AbstractAsyncContextManager[Services]]


def _publish(app: FastAPI, services: Services) -> None:
    """Make the services visible to routes, and their queue and job counts to `/metrics`."""
    app.state.services = services
    app.state.jobs_metrics = CollectorRegistry()
    app.state.jobs_metrics.register(
        JobsCollector(services.registry, services.store, services.queue)
    )


@asynccontextmanager
async def redis_services(settings: Settings, registry: Registry) -> AsyncIterator[Services]:
    """Jobs go to Celery workers; job state and images are read from Redis."""
    if not settings.redis_url:
        raise ValueError(
            "the gateway needs REDIS_URL (without it, `hypersd serve` embeds a worker)"
        )
    # Fail fast while Redis is down (a 503 now, not a request stuck in reconnect back-off); one
    # retry still covers a connection that went stale.
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=10,
        retry=Retry(NoBackoff(), retries=1),
    )
    store = RedisJobStore(client, settings.job_ttl_s)
    try:
        queue = CeleryQueue(create_celery(settings), client)
        served = settings.served_models or registry.names
        unknown = [name for name in served if name not in registry.names]
        if unknown:
            raise ValueError(f"HYPERSD_SERVED_MODELS names models not in the registry: {unknown}")
        if settings.default_model is not None and settings.default_model not in served:
            raise ValueError(f"HYPERSD_DEFAULT_MODEL {settings.default_model!r} is not served")
        yield Services(
            settings,
            registry,
            store,
            queue,
            served=served,
            auth=settings.auth is not False,
            service_times=RedisServiceTimes(client),  # what workers report, for SLA admission
            shared_device=settings.shared_device,
        )
    finally:
        store.close()
        client.close()


def _webhook_sender(services: Services) -> WebhookSender | None:
    """Started when webhooks are on: delivers the outbox's webhooks in the background, never in
    a client's request (`jobs.webhooks`)."""
    settings, store = services.settings, services.store
    if not settings.webhook_hosts:
        return None

    def render(record: JobRecord) -> bytes:
        job = job_service.to_job(record, store, settings.public_url, settings.job_ttl_s)
        return job.model_dump_json().encode()

    sender = WebhookSender(store, settings, render)
    sender.start()
    return sender


def create_app(
    settings: Settings | None = None, services: ServicesFactory = redis_services
) -> FastAPI:
    """The gateway's app.

    Args:
        settings: Read from the environment when not given.
        services: Opens the job store and the queue for the app's lifetime (default: Redis and
            Celery workers).
    """
    resolved = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = load_registry(resolved.registry)
        async with services(resolved, registry) as ready:
            _publish(app, ready)
            sender = _webhook_sender(ready)
            try:
                yield
            finally:
                if sender is not None:
                    sender.stop()

    app = FastAPI(
        title="hypersd",
        summary="1-8 step text-to-image (Hyper-SD): jobs over Redis and Celery workers",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodyLimits, max_bytes=resolved.max_body_bytes)
    app.add_middleware(RequestMetrics)
    if resolved.cors_origins:  # off by default: browsers of other origins are refused
        app.add_middleware(
            CORSMiddleware,
            allow_origins=resolved.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer"],
            expose_headers=["X-Request-Id", "Location", "Retry-After", "ETag"],
        )
    app.add_middleware(RequestId)  # outermost: every answer of the app carries it
    for module in (generations, events, openai_compat, system):
        app.include_router(module.router)
    page.install(app)

    return app
