"""Embedded mode: one process serves the gateway and runs the jobs, with no Redis.

The lifespan loads and warms up the model in this process and puts it behind `LocalQueue`, which
runs the same `JobRunner` and micro-batcher as a Celery worker; the server listens once it is
ready. Jobs live in memory and images in a local folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI

from hypersd.registry import Registry
from jobs.liveness import Heartbeat
from jobs.record import JobRecord
from jobs.settings import Settings
from jobs.store import MemoryJobStore
from service.app import create_app
from service.deps import Services
from worker.runner import JobRunner, load_runner


class LocalQueue:
    """The in-process `JobQueue`: `slots` threads calling the runner, like Celery's thread pool."""

    def __init__(self, runner: JobRunner, slots: int) -> None:
        self.runner = runner
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="task-slot")
        self._waiting = 0
        self._lock = threading.Lock()

    def _run(self, job_id: str) -> None:
        with self._lock:
            self._waiting -= 1
        self.runner.run_job(job_id)

    def submit(self, record: JobRecord) -> None:
        with self._lock:
            self._waiting += 1
        self._executor.submit(self._run, record.id)

    def depth(self, model: str) -> int:
        return self._waiting if model == self.runner.spec.name else 0

    def close(self) -> None:
        """Let submitted jobs finish (SIGTERM drains), then stop the batcher."""
        self._executor.shutdown(wait=True)
        self.runner.close()


@asynccontextmanager
async def embedded_services(settings: Settings, registry: Registry) -> AsyncIterator[Services]:
    """Load and warm up the model here, behind the in-process queue."""
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


def create_embedded_app(settings: Settings) -> FastAPI:
    """The gateway's app with the model served in this process."""
    return create_app(settings, services=embedded_services)
