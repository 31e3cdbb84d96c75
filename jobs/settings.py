"""All settings of the gateway and the worker, in one class read from the environment.

Each field is read from `HYPERSD_<NAME>` (e.g. `HYPERSD_MAX_BATCH_SIZE=8`), except the Redis URL,
which is `REDIS_URL`: without it, `hypersd serve` runs in embedded mode.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYPERSD_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "HYPERSD_REDIS_URL"),
        description="Redis for the queue, jobs and images; none = embedded mode",
    )
    registry: Path | None = Field(default=None, description="registry TOML (default: shipped)")
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = Field(
        default=None, description="the model a worker (or embedded mode) serves; default: default"
    )
    served_models: list[str] | None = Field(
        default=None,
        description="the models this deployment runs workers for, checked by /readyz "
        "(JSON list, e.g. '[\"shapes-hyper-1step\"]'); default: every registry model",
    )
    slots: int = Field(default=8, ge=1, description="task slots (threads) per worker")
    max_batch_size: int = Field(default=8, ge=1, description="images per pipeline call; 1 = off")
    max_wait_ms: float = Field(
        default=5.0, ge=0, description="how long a batch waits for more, while others are in flight"
    )
    job_ttl_s: int = Field(default=3600, ge=1, description="how long jobs and images are kept")
    job_timeout_s: float = Field(default=300.0, gt=0, description="a job's run time limit")
    visibility_timeout_s: int = Field(
        default=3600, description="Redis redelivers unacked messages after this; > any job"
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_file: Path | None = Field(default=None, description="touched on each beat")
    worker_metrics_port: int = Field(default=9101, description="the worker's /metrics; 0 = off")
    images_dir: Path | None = Field(
        default=None, description="embedded mode's image folder (default: a temporary folder)"
    )
    max_prefer_wait_s: float = Field(default=60.0, description="cap of `Prefer: wait=N`")
    sync_timeout_s: float = Field(default=120.0, description="the synchronous route's limit")
    device: str | None = None
    torch_threads: int | None = None
