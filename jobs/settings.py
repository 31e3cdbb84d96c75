"""All settings of the gateway and the worker, in one class read from the environment.

Each field is read from `HYPERSD_<NAME>` (e.g. `HYPERSD_MAX_BATCH_SIZE=8`), except the Redis URL,
which is `REDIS_URL`: without it, `hypersd serve` runs in embedded mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiKey(BaseModel):
    """A client's API key, by its SHA-256: the key itself is never configured, stored or logged.

    `name` is who holds it: a job belongs to the name of the key that made it (so a key can be
    rotated by giving the new one the same name), and idempotency keys are scoped by it.
    """

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    admin: bool = Field(default=False, description="may read and cancel any client's jobs")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYPERSD_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "HYPERSD_REDIS_URL"),
        description="Redis for the queue, jobs and images; none = embedded mode",
    )
    registry: Path | None = Field(default=None, description="registry TOML (default: shipped)")
    host: str = Field(default="127.0.0.1", description="the address `hypersd serve` listens on")
    port: int = Field(default=8000, description="the port `hypersd serve` listens on")
    model: str | None = Field(
        default=None,
        description="the model a worker serves (`hypersd worker --model`); default: the "
        "registry's default",
    )
    embedded_models: list[str] | None = Field(
        default=None,
        description="embedded mode: the models served in this process (JSON list; the "
        "playground's compare view wants several); default: `HYPERSD_MODEL`",
    )
    default_model: str | None = Field(
        default=None,
        description="the model of a request naming none; default: the served model when the "
        "deployment serves one, else the registry's default",
    )
    served_models: list[str] | None = Field(
        default=None,
        description="the models this deployment runs workers for: a request for another is "
        "refused (JSON list, e.g. '[\"shapes-hyper-1step\"]'); default: every registry model",
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
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, description="how often a worker beats; dead 3 beats after its last"
    )
    heartbeat_file: Path | None = Field(default=None, description="touched on each beat")
    worker_metrics_port: int = Field(default=9101, description="the worker's /metrics; 0 = off")
    images_dir: Path | None = Field(
        default=None, description="embedded mode's image folder (default: a temporary folder)"
    )
    max_prefer_wait_s: float = Field(default=60.0, description="cap of `Prefer: wait=N`")
    sync_timeout_s: float = Field(default=120.0, description="the synchronous route's limit")
    public_url: str | None = Field(
        default=None,
        description="the gateway's public base URL (e.g. 'https://images.example.com') for image "
        "URLs; default: relative URLs (never the request's Host header)",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1, description="the largest request body; a larger one is a 413"
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="embedded mode: how long SIGTERM waits for the running jobs before failing "
        "them (keep it below Kubernetes' terminationGracePeriodSeconds, 30 s by default)",
    )
    auth: bool | None = Field(
        default=None,
        description="require an API key (`Authorization: Bearer <key>`) on every route but "
        "/healthz, /readyz and /metrics; default: on, except embedded mode on a loopback host",
    )
    api_keys: list[ApiKey] = Field(
        default=[],  # pydantic copies it per instance
        description='JSON list of {"name", "sha256", "admin"} (e.g. from a Kubernetes Secret); '
        "`printf %s KEY | sha256sum` gives a key's hash",
    )
    rate_limit_per_s: float | None = Field(
        default=None,
        gt=0,
        description="job submissions per second per API key (a token bucket shared by gateway "
        "replicas through Redis); default: no limit",
    )
    rate_limit_burst: int = Field(default=10, ge=1, description="the token bucket's size")
    max_jobs_in_flight: int | None = Field(
        default=None, ge=1, description="queued + running jobs per API key; default: no cap"
    )
    max_queue_depth: int | None = Field(
        default=None, ge=1, description="jobs waiting in a model's queue; default: no cap"
    )
    deadline_headroom: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="a job with a deadline is admitted when its predicted finish is within this "
        "share of the deadline (the rest is room for the prediction's error)",
    )
    shared_device: bool = Field(
        default=False,
        description="the served models' workers share one device (several workers on one GPU "
        "or CPU): a deadline's prediction counts the work queued for every model, not only its "
        "own; embedded mode always does",
    )
    device: str | None = Field(
        default=None,
        description="the worker's torch device (e.g. 'cuda:0'); default: cuda if any, else cpu",
    )
    torch_threads: int | None = Field(
        default=None, description="torch's CPU threads in a worker; default: torch's choice"
    )
    webhook_hosts: list[str] = Field(
        default=[],
        description="hosts a job's `webhook` URL may name (JSON list, e.g. "
        "'[\"hooks.example.com\"]'); a name resolving to a loopback, private or link-local "
        "address is refused unless that address is listed too; empty: webhooks are refused",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="the HMAC-SHA256 key webhooks are signed with (needed with `webhook_hosts`)",
    )
    webhook_max_attempts: int = Field(
        default=10, ge=1, le=20, description="deliveries tried per webhook (1 s, 2 s, 4 s... apart)"
    )
    webhook_timeout_s: float = Field(default=5.0, gt=0, description="one delivery's time limit")
    cors_origins: list[str] = Field(
        default=[],
        description="origins browsers may call the API from (JSON list, e.g. "
        "'[\"https://app.example.com\"]'); default: none (CORS off)",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object per log line (timestamp, level, logger, message, "
        "request_id)",
    )

    @field_validator("api_keys")
    @classmethod
    def _distinct_hashes(cls, keys: list[ApiKey]) -> list[ApiKey]:
        if len({key.sha256 for key in keys}) != len(keys):
            raise ValueError("two API keys have the same hash")
        return keys
