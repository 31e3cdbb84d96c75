"""The Celery app and `run_worker`, what `hypersd worker` runs.

Why a thread pool (`--pool threads`, `slots` threads) and not prefork: the model is loaded once, in
the process that uses it, before the worker consumes, and nothing forks afterwards, so no CUDA or
model state ever crosses a fork; the slots share one pipeline through the micro-batcher, which is
what lets concurrent jobs run as one batch. One worker process per GPU, scaled by adding workers.

Celery's thread pool does not enforce `task_time_limit`s (only prefork does); they are set for the
record, and `JobRunner` enforces `job_timeout_s` itself by failing a job that waits longer.
"""

from __future__ import annotations

import logging
import os
import socket

import redis
from celery import Celery
from prometheus_client import start_http_server

from hypersd.registry import load_registry
from service.settings import Settings
from worker.heartbeat import Heartbeat
from worker.queue import TASK_NAME, CeleryQueue, queue_name
from worker.runner import load_runner
from worker.store import RedisJobStore

log = logging.getLogger(__name__)


def create_celery(settings: Settings) -> Celery:
    """The Celery app on the Redis broker, as the gateway and the workers both configure it."""
    if settings.visibility_timeout_s <= settings.job_timeout_s + 30:
        raise ValueError("visibility_timeout_s must exceed job_timeout_s + 30 (the hard limit)")
    app = Celery("hypersd", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the job store
        task_acks_late=True,  # a job is acked when done, so a lost worker's job comes back
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker reserves no more jobs than it has slots
        task_soft_time_limit=settings.job_timeout_s,
        task_time_limit=settings.job_timeout_s + 30,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


def run_worker(settings: Settings) -> None:
    """Load and warm up the model, start heartbeat and metrics, then consume its queue.

    Returns after a warm shutdown (SIGTERM: Celery stops taking jobs and waits for the running
    ones, whose batches the batcher finishes).
    """
    if not settings.redis_url:
        raise ValueError("hypersd worker needs REDIS_URL (without it, `hypersd serve` embeds one)")
    spec = load_registry(settings.registry).get(settings.model)
    client = redis.Redis.from_url(settings.redis_url)
    store = RedisJobStore(client, settings.job_ttl_s)
    worker_id = f"{spec.name}@{socket.gethostname()}.{os.getpid()}"
    runner = load_runner(
        spec,
        store,
        worker_id=worker_id,
        slots=settings.slots,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        job_timeout_s=settings.job_timeout_s,
        device=settings.device,
        torch_threads=settings.torch_threads,
    )
    app = create_celery(settings)

    @app.task(name=TASK_NAME)
    def generate(job_id: str) -> None:
        runner.run_job(job_id)

    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port)
    heartbeat = Heartbeat(
        store,
        runner.info,
        interval_s=settings.heartbeat_interval_s,
        file=settings.heartbeat_file,
        queue=CeleryQueue(app, client),
    )
    heartbeat.start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={settings.slots}",
                f"--queues={queue_name(spec.name)}",
                f"--hostname={worker_id}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
            ]
        )
    finally:
        heartbeat.stop()
        runner.close()
