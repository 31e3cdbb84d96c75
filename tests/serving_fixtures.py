"""Fixtures for the serving tests: a real redis-server, Celery worker and uvicorn processes.

Registered as a pytest plugin by `conftest.py`. Each process is started the way a user starts it
(`hypersd serve`, `hypersd worker`), with one torch thread (the test machines share two cores),
and is always stopped at the end of its fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from hypersd.registry import ModelSpec
    from jobs.store import JobStore
    from worker.runner import JobRunner

REPO = Path(__file__).resolve().parent.parent
SHIPPED_REGISTRY = REPO / "models" / "registry.toml"
# The model whose workers the serving-mechanics tests run (batching, validation, recovery), named
# in their requests: the teacher, served by name, whose 1-50 steps give both quick 1-step jobs and
# slow 50-step ones (long enough to kill a worker or stop Redis mid-job). The registry's default
# model (a request naming none) is served by the embedded server (`test_serving_embedded.py`) and
# by a worker started without a model (`test_serving_default_model.py`).
MODEL = "shapes-base"


def one_slot_runner(spec: ModelSpec, store: JobStore, **options: Any) -> JobRunner:
    """The real job runner in this process: one slot, batches of one, no batching wait and one
    torch thread; `options` add to or override `load_runner`'s arguments."""
    from worker.runner import load_runner

    arguments: dict[str, Any] = {
        "worker_id": "w1",
        "slots": 1,
        "max_batch_size": 1,
        "max_wait_ms": 0,
        "job_timeout_s": 60,
        "torch_threads": 1,
    }
    return load_runner(spec, store, **(arguments | options))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s:g} s")


@dataclass
class Process:
    """A started subprocess and its log file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not end in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


# `hypersd` from this checkout, run by the test's own interpreter.
HYPERSD = (sys.executable, "-m", "launcher")


def start_process(
    args: list[str], env: dict[str, str], log: Path, hypersd: Sequence[str] = HYPERSD
) -> Process:
    """`hypersd ARGS` (`hypersd`: the command, e.g. another install's script)."""
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*hypersd, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Process(popen, log)


def serving_env(**settings: str | int | float) -> dict[str, str]:
    """The environment of a test process: shipped registry, one thread, fast heartbeats."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HYPERSD_")}
    env.pop("REDIS_URL", None)
    # The run's shared artefact cache (conftest's `engine_cache`): workers load the ONNX Runtime
    # exports of the shipped models from it instead of each exporting its own.
    if "HYPERSD_ENGINE_CACHE" in os.environ:
        env["HYPERSD_ENGINE_CACHE"] = os.environ["HYPERSD_ENGINE_CACHE"]
    env |= {
        "OMP_NUM_THREADS": "1",
        "HYPERSD_TORCH_THREADS": "1",
        "HYPERSD_REGISTRY": str(SHIPPED_REGISTRY),
        "HYPERSD_HEARTBEAT_INTERVAL_S": "0.5",
        # the tests run workers for MODEL only (`served_models=` overrides)
        "HYPERSD_SERVED_MODELS": json.dumps([MODEL]),
        # API keys are the auth tests' subject (`test_serving_auth.py`, `auth=true`); elsewhere
        # the gateway runs with auth off, as configured here
        "HYPERSD_AUTH": "false",
    }
    env |= {f"HYPERSD_{key.upper()}": str(value) for key, value in settings.items()}
    return env


@dataclass
class Server:
    """A running `hypersd serve`."""

    url: str
    process: Process


def start_server(
    env: dict[str, str], log: Path, timeout_s: float = 90, hypersd: Sequence[str] = HYPERSD
) -> Server:
    port = free_port()
    process = start_process(["serve", "--port", str(port)], env, log, hypersd)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.popen.poll() is not None:
            raise RuntimeError(f"server exited:\n{process.output()}")
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200

    wait_until(up, timeout_s, "hypersd serve")
    return Server(url, process)


def live_workers(server: Server) -> dict[str, int]:
    """Live workers per model, as `GET /v1/models` reports them (from heartbeats)."""
    models = httpx.get(f"{server.url}/v1/models", timeout=1).json()["data"]
    return {model["id"]: model["workers"] for model in models}


def wait_ready(server: Server, models: Sequence[str] = (MODEL,), timeout_s: float = 90) -> None:
    """Until the gateway is ready (`/readyz`: Redis answers) and each of `models` has a live
    worker (`/v1/models`; readiness does not wait for workers, which may scale from zero)."""

    def ready() -> bool:
        if httpx.get(f"{server.url}/readyz", timeout=1).status_code != 200:
            return False
        workers = live_workers(server)
        return all(workers.get(model, 0) > 0 for model in models)

    wait_until(ready, timeout_s, f"a live worker for each of {list(models)}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this test session, on a free port (noeviction, no persistence)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.skip("redis-server is not installed")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    popen = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    redis = pytest.importorskip("redis")
    client = redis.Redis(port=port)
    wait_until(lambda: bool(client.ping()), 10, "redis-server")
    client.close()
    yield f"redis://127.0.0.1:{port}"
    popen.terminate()
    popen.wait(10)


@dataclass
class Stack:
    """Gateway + one Celery worker (for MODEL) on a Redis database of their own."""

    server: Server
    worker: Process
    redis_url: str
    worker_metrics_url: str
    heartbeat_file: Path


def start_worker(
    redis_url: str, log: Path, model: str | None = MODEL, **settings: str | int | float
) -> Process:
    """`hypersd worker` for `model` (None: no `--model`, the registry's default).

    Its metrics server is off unless asked for.
    """
    env = serving_env(**{"redis_url": redis_url, "worker_metrics_port": 0, **settings})
    return start_process(["worker"] if model is None else ["worker", "--model", model], env, log)


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`hypersd serve` (enqueue only) and `hypersd worker` for MODEL (4 slots) on Redis db 0."""
    logs = tmp_path_factory.mktemp("stack")
    url = f"{redis_url}/0"
    metrics_port = free_port()
    worker = start_worker(
        url,
        logs / "worker.log",
        slots=4,
        max_batch_size=8,
        max_wait_ms=50,
        worker_metrics_port=metrics_port,
        heartbeat_file=logs / "heartbeat.json",
    )
    server = start_server(serving_env(redis_url=url), logs / "gateway.log")
    try:
        wait_ready(server)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Stack(server, worker, url, metrics_url, logs / "heartbeat.json")
    finally:
        worker.stop()
        server.process.stop()
