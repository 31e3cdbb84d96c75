"""The gateway's Prometheus series (base units; labels are route templates, codes and models).

Queue depth, finished jobs and live workers are read from the queue and the job store at scrape
time, so they are right whichever gateway replica or worker changed them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypersd.registry import Registry
from jobs.queue import JobQueue
from jobs.store import JobStore

REQUESTS = Counter("hypersd_http_requests", "HTTP requests by route and code.", ["route", "code"])
REQUEST_DURATION = Histogram(
    "hypersd_http_request_duration_seconds",
    "HTTP request duration by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
JOBS_SUBMITTED = Counter("hypersd_jobs_submitted", "Jobs submitted, by model.", ["model"])


class RequestMetrics:
    """Middleware: count and time requests by route template (never the raw path: ids).

    Plain ASGI rather than `@app.middleware("http")`, whose request/response streaming costs
    about a millisecond per request: a few percent of a one-step generation.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router stores the matched route in the (shared) scope.
            label = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(label, str(status)).inc()
            REQUEST_DURATION.labels(label).observe(time.perf_counter() - started)


class JobsCollector(Collector):
    """Queue depth per model and finished jobs by model and status, read when scraped."""

    def __init__(self, registry: Registry, store: JobStore, queue: JobQueue) -> None:
        self.registry = registry
        self.store = store
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "hypersd_queue_depth", "Jobs waiting for a worker, by model.", labels=["model"]
        )
        for name in self.registry.names:
            depth.add_metric([name], self.queue.depth(name))
        yield depth
        finished = CounterMetricFamily(
            "hypersd_jobs_finished",
            "Jobs finished, by model and status.",
            labels=["model", "status"],
        )
        for (model, status), count in sorted(self.store.finished_counts().items()):
            finished.add_metric([model, status], count)
        yield finished
        # Live workers (a heartbeat in its lifetime) by model and backend: the alert "jobs queued
        # and no worker" and the dashboard's "backend in use" read it.
        workers = GaugeMetricFamily(
            "hypersd_workers", "Live workers, by model and backend.", labels=["model", "backend"]
        )
        live = collections.Counter((info.model, info.backend) for info in self.store.workers())
        for (model, backend), count in sorted(live.items()):
            workers.add_metric([model, backend], count)
        yield workers
