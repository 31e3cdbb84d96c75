"""`run_worker`, what `hypersd worker` runs: the model loaded once, the generate task, Celery.

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
from prometheus_client import start_http_server

from hypersd.registry import load_registry
from jobs.liveness import Heartbeat
from jobs.queue import TASK_NAME, CeleryQueue, create_celery, queue_name
from jobs.redis_store import RedisJobStore
from jobs.service_time import RedisServiceTimes
from jobs.settings import Settings
from worker.runner import load_runner_from_settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Load and warm up the model, start heartbeat and metrics, then consume its queue.

    Returns after a warm shutdown (SIGTERM: Celery stops taking jobs and waits for the running
    ones, whose batches the batcher finishes).
    """
    if not settings.redis_url:
        raise ValueError("hypersd worker needs REDIS_URL (without it, `hypersd serve` embeds one)")
    spec = load_registry(settings.registry).get(settings.model)
    # The metrics port first: a port taken by another worker on this host fails at once, with one
    # line, not after the model has loaded.
    if settings.worker_metrics_port:
        try:
            start_http_server(settings.worker_metrics_port)
        except OSError as error:
            raise ValueError(
                f"metrics port {settings.worker_metrics_port} is in use ({error.strerror}): give "
                "each worker on this host its own (--metrics-port or HYPERSD_WORKER_METRICS_PORT; "
                "0 turns metrics off)"
            ) from None
    client = redis.Redis.from_url(settings.redis_url)
    store = RedisJobStore(client, settings.job_ttl_s)
    worker_id = f"{spec.name}@{socket.gethostname()}.{os.getpid()}"
    runner = load_runner_from_settings(
        spec,
        store,
        worker_id=worker_id,
        settings=settings,
        service_times=RedisServiceTimes(client),  # read by the gateways' SLA admission
    )
    app = create_celery(settings)

    @app.task(name=TASK_NAME)
    def generate(job_id: str) -> None:
        runner.run_job(job_id)

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
