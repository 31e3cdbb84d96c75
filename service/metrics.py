"""The gateway's Prometheus series (base units; labels are route templates, codes and models).

Queue depth and finished jobs are read from the queue and the job store at scrape time, so they
are right whichever gateway replica or worker changed them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import Request, Response
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hypersd.registry import Registry
from worker.queue import JobQueue
from worker.store import JobStore

REQUESTS = Counter("hypersd_http_requests", "HTTP requests by route and code.", ["route", "code"])
REQUEST_DURATION = Histogram(
    "hypersd_http_request_duration_seconds",
    "HTTP request duration by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
JOBS_SUBMITTED = Counter("hypersd_jobs_submitted", "Jobs submitted, by model.", ["model"])


async def observe_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Middleware: count and time requests by route template (never the raw path: ids)."""
    started = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    label = getattr(route, "path", "unmatched")
    REQUESTS.labels(label, str(response.status_code)).inc()
    REQUEST_DURATION.labels(label).observe(time.perf_counter() - started)
    return response


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
