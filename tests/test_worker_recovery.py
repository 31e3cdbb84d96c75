"""No job lost: a worker killed -9 mid-job, and a worker stopped with SIGTERM mid-job.

Runs on a Redis database of its own, so the session's worker cannot take these jobs.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from serving_fixtures import (
    MODEL,
    Process,
    Server,
    live_workers,
    serving_env,
    start_server,
    start_worker,
    wait_ready,
)

PROMPT = "a small blue triangle to the left of a large yellow square on a black background"
# The teacher at 50 steps: a few seconds on one thread, long enough to kill.
SLOW_JOB = {"prompt": PROMPT, "model": MODEL, "steps": 50}

# A consumer that takes one message the way a Celery worker does (kombu, acks late) and dies
# before acking or marking the job running: the moment a worker killed between the two leaves.
TAKE_AND_DIE = """
import os, sys
from kombu import Connection
with Connection(sys.argv[1]) as connection:
    message = connection.SimpleQueue(sys.argv[2]).get(timeout=30)
    print(message.delivery_tag, flush=True)
    os._exit(0)  # no ack, and none of kombu's restore-at-close: as kill -9
"""


@pytest.fixture(scope="module")
def db_url(redis_url: str) -> str:
    return f"{redis_url}/1"


@pytest.fixture(scope="module")
def gateway(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        serving_env(redis_url=db_url), tmp_path_factory.mktemp("recovery") / "gateway.log"
    )
    yield server
    server.process.stop()


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/generations/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout_s:g} s"
        time.sleep(0.02)


def test_a_job_whose_worker_is_killed_is_completed_by_a_new_worker(
    gateway: Server, db_url: str, tmp_path: Path
) -> None:
    first = start_worker(db_url, tmp_path / "first.log", slots=1)
    second: Process | None = None
    try:
        wait_ready(gateway)
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            job_id = client.post("/v1/generations", json=SLOW_JOB).json()["id"]
            wait_for(client, job_id, {"running"}, 60)
            first.kill()  # SIGKILL: no chance to ack, requeue or clean up
            assert client.get(f"/v1/generations/{job_id}").json()["status"] == "running"

            second = start_worker(db_url, tmp_path / "second.log", slots=1)
            job = wait_for(client, job_id, {"succeeded", "failed"}, 90)
            assert job["status"] == "succeeded", job
            image = client.get(job["images"][0]["url"])
            with Image.open(io.BytesIO(image.content)) as png:
                assert png.size == (64, 64)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert "lost its worker" in second.output()


def test_a_job_taken_by_a_worker_that_died_before_starting_it_is_given_back(
    gateway: Server, db_url: str, tmp_path: Path
) -> None:
    worker: Process | None = None
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        job_id = client.post(
            "/v1/generations", json={"prompt": PROMPT, "model": MODEL, "steps": 1}
        ).json()["id"]
        subprocess.run(
            [sys.executable, "-c", TAKE_AND_DIE, db_url, f"hypersd.{MODEL}"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert client.get(f"/v1/generations/{job_id}").json()["status"] == "queued"
        try:
            # The broker would redeliver it after its visibility timeout (an hour); the reaper
            # gives it back once the message is a heartbeat lifetime old.
            worker = start_worker(db_url, tmp_path / "worker.log", slots=1)
            job = wait_for(client, job_id, {"succeeded", "failed"}, 90)
            assert job["status"] == "succeeded", job
        finally:
            if worker is not None:
                worker.stop()
    assert "taken but never started" in worker.output()


def test_sigterm_finishes_the_running_job_then_exits(
    gateway: Server, db_url: str, tmp_path: Path
) -> None:
    worker = start_worker(db_url, tmp_path / "worker.log", slots=1)
    try:
        wait_ready(gateway)
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            job_id = client.post("/v1/generations", json=SLOW_JOB).json()["id"]
            wait_for(client, job_id, {"running"}, 60)
            worker.popen.send_signal(signal.SIGTERM)
            assert worker.popen.wait(60) == 0, worker.output()
            assert client.get(f"/v1/generations/{job_id}").json()["status"] == "succeeded"
            # The worker withdrew its heartbeat: the model has no live worker any more, while the
            # gateway itself stays ready (it needs Redis, not workers).
            assert live_workers(gateway)[MODEL] == 0
            assert client.get("/readyz").status_code == 200
    finally:
        worker.stop()
