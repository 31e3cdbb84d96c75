"""The worker's Prometheus series (base units; labels are model, steps, phase and backend only).

A Celery worker serves them on its own port (`HYPERSD_WORKER_METRICS_PORT`); in embedded mode they
live in the gateway's process and appear on its `/metrics`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

QUEUE_WAIT = Histogram(
    "hypersd_worker_queue_wait_seconds",
    "Time from job creation to the start of its run.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
RUN_TIME = Histogram(
    "hypersd_worker_run_seconds",
    "Run time of a job by phase: text_encoding, denoising, vae_decode (of its batch), "
    "image_encoding and total.",
    ["model", "steps", "phase"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "hypersd_worker_batch_size",
    "Images per pipeline call.",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
MODEL_LOAD = Gauge(
    "hypersd_worker_model_load_seconds", "Seconds to load and warm up the model.", ["model"]
)
BUSY_SLOTS = Gauge("hypersd_worker_busy_slots", "Task slots running a job now.", ["model"])
BACKEND = Gauge(
    "hypersd_worker_backend",
    "1 for the backend the model runs on (eager after a fallback), 0 for the others.",
    ["model", "backend"],
)
BACKEND_FALLBACKS = Counter(
    "hypersd_worker_backend_fallbacks",
    "Loads whose registry backend failed and that fell back to eager (by the failed backend).",
    ["model", "backend"],
)
