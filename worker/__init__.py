"""The worker: Celery app, job runner, in-process micro-batcher, job store and heartbeats.

`celery_app` (what `hypersd worker` runs), `runner` (the task body, shared with embedded mode),
`batcher`, `queue` (Celery or in-process), `store` (Redis or memory), `heartbeat` (and the reaper
that recovers the jobs of dead workers), `metrics` (the worker's series).
"""
