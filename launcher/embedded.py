"""Embedded mode: one process serves the gateway and runs the jobs, with no Redis.

The lifespan loads and warms up the models in this process and puts each behind a `LocalQueue`,
which runs the same `JobRunner` and micro-batcher as a Celery worker; the server listens once it
is ready. Jobs live in memory and images in a local folder.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI

from hypersd.registry import Registry
from jobs.liveness import Heartbeat
from jobs.memory_store import MemoryJobStore
from jobs.record import JobRecord
from jobs.service_time import MemoryServiceTimes
from jobs.settings import Settings
from jobs.states import abandon
from jobs.store import JobStore
from service.app import create_app
from service.deps import Services
from service.errors import ApiError
from worker.runner import JobRunner, load_runner_from_settings

log = logging.getLogger(__name__)


class LocalQueue:
    """The in-process `JobQueue`: `slots` threads calling the runner, like Celery's thread pool.

    Shutdown (`close`) finishes the jobs already in a slot (their batch is running, or about to)
    and fails the queued rest with a reason at once: the queue lives in this process, so nobody
    would ever run them, and running them all first took past Kubernetes' 30 s grace.
    """

    def __init__(self, runner: JobRunner, store: JobStore, slots: int) -> None:
        self.runner = runner
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="task-slot")
        self._lock = threading.Lock()
        self._queued: set[str] = set()  # submitted, not yet in a slot
        self._in_slot: set[str] = set()
        self._closing = False

    def _run(self, job_id: str) -> None:
        with self._lock:
            if self._closing:  # `close` fails the queued jobs
                return
            self._queued.discard(job_id)
            self._in_slot.add(job_id)
        try:
            self.runner.run_job(job_id)
        finally:
            with self._lock:
                self._in_slot.discard(job_id)

    def submit(self, record: JobRecord) -> None:
        with self._lock:
            if self._closing:
                raise ApiError(503, "unavailable", "the server is shutting down")
            self._queued.add(record.id)
        self._executor.submit(self._run, record.id)

    def depth(self, model: str) -> int:
        with self._lock:
            return len(self._queued) if model == self.runner.spec.name else 0

    def _abandon(self, job_ids: Iterable[str], message: str) -> int:
        change = abandon(message)
        return sum(self.store.update(job_id, change) is not None for job_id in job_ids)

    def close(self, grace_s: float) -> None:
        """Finish the jobs in a slot within `grace_s` seconds, fail the others with a reason.

        A job still running after `grace_s` is failed too, but its pipeline call cannot be
        interrupted: the process exits once that call returns.
        """
        with self._lock:
            self._closing = True
            queued, self._queued = sorted(self._queued), set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        failed = self._abandon(queued, "the server shut down before the job started")
        if failed:
            log.warning("shutdown: %d queued jobs failed (not started)", failed)
        drained = threading.Thread(target=self._executor.shutdown, name="drain", daemon=True)
        drained.start()
        drained.join(grace_s)
        if drained.is_alive():
            with self._lock:
                running = sorted(self._in_slot)
            message = f"the server shut down; the job did not finish within {grace_s:g} s"
            log.warning(
                "shutdown: %d running jobs failed (past the %g s grace)",
                self._abandon(running, message),
                grace_s,
            )
        else:
            self.runner.close()


def _auth(settings: Settings) -> bool:
    """Whether requests need an API key: as configured, else only off a loopback host (a server
    one user runs for themselves; anything listening beyond this machine needs keys)."""
    if settings.auth is not None:
        return settings.auth
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:  # a host name
        loopback = settings.host == "localhost"
    if loopback:
        log.warning(
            "auth is off: embedded mode on %s (loopback) takes requests without an API key; "
            "set HYPERSD_AUTH=true and HYPERSD_API_KEYS to require one",
            settings.host,
        )
    return not loopback


class ModelQueues:
    """The in-process `JobQueue` of several models: each job goes to its model's `LocalQueue`."""

    def __init__(self, queues: dict[str, LocalQueue]) -> None:
        self.queues = queues

    def submit(self, record: JobRecord) -> None:
        self.queues[record.model].submit(record)

    def depth(self, model: str) -> int:
        queue = self.queues.get(model)
        return 0 if queue is None else queue.depth(model)

    def close(self, grace_s: float) -> None:
        """Close every model's queue at once, so the grace is not spent once per model."""
        closing = [
            threading.Thread(target=queue.close, args=(grace_s,), name=f"close-{model}")
            for model, queue in self.queues.items()
        ]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join()


@asynccontextmanager
async def embedded_services(settings: Settings, registry: Registry) -> AsyncIterator[Services]:
    """Load and warm up the models here (`HYPERSD_EMBEDDED_MODELS`, else `HYPERSD_MODEL`), each
    behind its in-process queue, with a heartbeat each as a worker has."""
    names = settings.embedded_models or [registry.get(settings.model).name]
    specs = [registry.get(name) for name in dict.fromkeys(names)]
    auth = _auth(settings)
    # Without a configured folder, images live in a scratch folder removed at shutdown.
    images_dir = settings.images_dir or Path(tempfile.mkdtemp(prefix="hypersd-images-"))
    store = MemoryJobStore(images_dir, settings.job_ttl_s)
    # what the in-process workers report and SLA admission reads, as Redis holds them for Celery
    service_times = MemoryServiceTimes()
    queues: dict[str, LocalQueue] = {}
    heartbeats: list[Heartbeat] = []
    for spec in specs:  # one after the other: loading is CPU-bound, and it keeps the log readable
        load = functools.partial(
            load_runner_from_settings,
            spec,
            store,
            worker_id=f"{spec.name}@embedded.{os.getpid()}",
            settings=settings,
            service_times=service_times,
        )
        runner = await anyio.to_thread.run_sync(load)
        queues[spec.name] = LocalQueue(runner, store, settings.slots)
        # The heartbeat file (a liveness probe) is the process's: the first model's beat writes it.
        heartbeat_file = settings.heartbeat_file if not heartbeats else None
        heartbeats.append(
            Heartbeat(
                store, runner.info, interval_s=settings.heartbeat_interval_s, file=heartbeat_file
            )
        )
        heartbeats[-1].start()
    queue = ModelQueues(queues)
    try:
        yield Services(
            settings,
            registry,
            store,
            queue,
            served=list(queues),
            auth=auth,
            service_times=service_times,
            shared_device=True,  # the models run in this one process, on its CPU or GPU
        )
    finally:
        for heartbeat in heartbeats:
            heartbeat.stop()
        await anyio.to_thread.run_sync(queue.close, settings.shutdown_grace_s)
        if settings.images_dir is None:
            shutil.rmtree(images_dir, ignore_errors=True)


def create_embedded_app(settings: Settings) -> FastAPI:
    """The gateway's app with the models served in this process."""
    return create_app(settings, services=embedded_services)
