"""Redis restarted mid-job: clear 503s while it is down; the job completes once it is back.

The Redis here persists (append-only file, fsync always), as a production broker must: a restart
without persistence loses every queued message and job, which no client can make up for.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image
from serving_fixtures import (
    MODEL,
    free_port,
    serving_env,
    start_server,
    start_worker,
    wait_ready,
    wait_until,
)

PROMPT = "a small blue triangle to the left of a large yellow square on a black background"
# Four 50-step images of the teacher in one batch: seconds on one thread, long enough to stop
# Redis mid-job.
SLOW_JOB = {"prompt": PROMPT, "model": MODEL, "steps": 50, "n": 4}


class PersistentRedis:
    """A redis-server that keeps its data in `folder` across restarts, on a fixed port."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(self.binary).exists():
            pytest.skip("redis-server is not installed")
        self.folder = folder
        self.port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: bool(client.ping()), 10, "redis-server")
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)


def status_of(client: httpx.Client, job_id: str) -> str | None:
    """The job's status, or None while the gateway cannot read it (Redis down or loading)."""
    response = client.get(f"/v1/generations/{job_id}")
    return response.json()["status"] if response.status_code == 200 else None


def assert_unavailable(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "unavailable" and "Redis" in error["message"]
    return error


def test_a_job_survives_a_redis_restart_and_the_gateway_answers_503_meanwhile(
    tmp_path: Path,
) -> None:
    (tmp_path / "redis").mkdir()
    broker = PersistentRedis(tmp_path / "redis")
    broker.start()
    worker = start_worker(broker.url, tmp_path / "worker.log", slots=1)
    server = start_server(serving_env(redis_url=broker.url), tmp_path / "gateway.log")
    try:
        wait_ready(server)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            job_id = client.post("/v1/generations", json=SLOW_JOB).json()["id"]
            wait_until(lambda: status_of(client, job_id) == "running", 60, "the job running")
            broker.stop()

            started = time.monotonic()
            assert_unavailable(client.get(f"/v1/generations/{job_id}"))
            assert_unavailable(client.post("/v1/generations", json=SLOW_JOB))
            waiting = {"Prefer": "wait=10"}
            assert_unavailable(client.post("/v1/generations", json=SLOW_JOB, headers=waiting))
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
            assert time.monotonic() - started < 5, "the gateway hung while Redis was down"

            # The worker finishes the images and holds them until Redis is back.
            wait_until(
                lambda: "job store unavailable" in worker.output(), 120, "the job's result held"
            )
            broker.start()
            wait_until(
                lambda: status_of(client, job_id) in ("succeeded", "failed"), 60, "the job's end"
            )
            job = client.get(f"/v1/generations/{job_id}").json()
            assert job["status"] == "succeeded", job
            with Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)) as png:
                assert png.size == (64, 64)

            # The worker consumes again, and a waiting request is answered.
            wait_ready(server, timeout_s=30)
            after = client.post(
                "/v1/generations",
                json={"prompt": PROMPT, "model": MODEL, "steps": 1},
                headers={"Prefer": "wait=60"},
                timeout=90,
            )
            assert after.status_code == 200 and after.json()["status"] == "succeeded", after.text
    finally:
        worker.stop()
        server.process.stop()
        broker.stop()
