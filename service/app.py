"""The FastAPI app: `create_app(settings)` wires the job store, the queue and the routes.

With `REDIS_URL` set, the gateway only enqueues (Celery workers run the jobs). Without it, embedded
mode: the lifespan loads and warms up the default model in this process, behind `LocalQueue`, which
runs the same `JobRunner` and micro-batcher as a Celery worker; the server listens once it is ready.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import redis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from hypersd.registry import Registry, load_registry
from service import errors, generations, openai_compat, system
from service.deps import Services
from service.metrics import JobsCollector, RequestMetrics
from service.settings import Settings
from worker.heartbeat import Heartbeat
from worker.queue import CeleryQueue, LocalQueue
from worker.runner import load_runner
from worker.store import MemoryJobStore, RedisJobStore


def _publish(app: FastAPI, services: Services) -> None:
    """Make the services visible to routes, and their queue and job counts to `/metrics`."""
    app.state.services = services
    app.state.jobs_metrics = CollectorRegistry()
    app.state.jobs_metrics.register(
        JobsCollector(services.registry, services.store, services.queue)
    )


@asynccontextmanager
async def _gateway_only(settings: Settings, registry: Registry) -> AsyncIterator[Services]:
    """REDIS_URL set: jobs go to Celery workers; job state and images are read from Redis."""
    from worker.celery_app import create_celery

    # Fail fast while Redis is down (a 503 now, not a request stuck in reconnect back-off); one
    # retry still covers a connection that went stale.
    client = redis.Redis.from_url(
        settings.redis_url or "",
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
        yield Services(settings, registry, store, queue, served=served)
    finally:
        store.close()
        client.close()


@asynccontextmanager
async def _embedded(settings: Settings, registry: Registry) -> AsyncIterator[Services]:
    """No REDIS_URL: load and warm up the model here, behind the in-process queue."""
    spec = registry.get(settings.model)
    # Without a configured folder, images live in a scratch folder removed at shutdown.
    images_dir = settings.images_dir or Path(tempfile.mkdtemp(prefix="hypersd-images-"))
    store = MemoryJobStore(images_dir, settings.job_ttl_s)
    runner = await anyio.to_thread.run_sync(
        lambda: load_runner(
            spec,
            store,
            worker_id=f"{spec.name}@embedded.{os.getpid()}",
            slots=settings.slots,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            job_timeout_s=settings.job_timeout_s,
            device=settings.device,
            torch_threads=settings.torch_threads,
        )
    )
    queue = LocalQueue(runner, settings.slots)
    heartbeat = Heartbeat(
        store, runner.info, interval_s=settings.heartbeat_interval_s, file=settings.heartbeat_file
    )
    heartbeat.start()
    try:
        yield Services(settings, registry, store, queue, served=[spec.name])
    finally:
        heartbeat.stop()
        await anyio.to_thread.run_sync(queue.close)  # finish the jobs taken (drain)
        if settings.images_dir is None:
            shutil.rmtree(images_dir, ignore_errors=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = load_registry(settings.registry)
        services = _gateway_only if settings.redis_url else _embedded
        async with services(settings, registry) as ready:
            _publish(app, ready)
            yield

    app = FastAPI(
        title="hypersd",
        summary="1-8 step text-to-image (Hyper-SD): jobs over Redis and Celery workers",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(RequestMetrics)
    for module in (generations, openai_compat, system):
        app.include_router(module.router)

    return app
