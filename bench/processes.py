"""Real processes for the fuzz and chaos proofs: redis-server, `hypersd serve`, `hypersd worker`.

Each is started the way a user starts it, on a free loopback port, with its output in a log file,
and stopped (SIGTERM, then SIGKILL) when its `Proc.stop` is called or its `ExitStack` closes.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parent.parent
REGISTRY = REPO / "models" / "registry.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` (errors count as not yet) until it holds, else raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError, redis.RedisError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s:g} s")


@dataclass
class Proc:
    """A started process: its arguments (to start it again), environment and log."""

    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.args, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """kill -9."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM, then SIGKILL if it has not ended within `timeout_s`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


def redis_server(folder: Path, port: int, aof: bool = False) -> Proc:
    """A redis-server on `port` keeping its data in `folder` (AOF with fsync on every write)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else []
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)]
    args += ["--appendonly", "no"] if not aof else persistence
    proc = Proc([*args, "--maxmemory-policy", "noeviction"], dict(os.environ), folder / "redis.log")
    client = redis.Redis(port=port)
    wait_until(lambda: bool(client.ping()), 30, "redis-server")
    client.close()
    return proc


def hypersd_env(redis_url: str, models: list[str], **settings: object) -> dict[str, str]:
    """The environment of a gateway or worker: one torch thread, fast heartbeats, auth off."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HYPERSD_")}
    env |= {
        "REDIS_URL": redis_url,
        "OMP_NUM_THREADS": "1",
        "HYPERSD_TORCH_THREADS": "1",
        "HYPERSD_REGISTRY": str(REGISTRY),
        "HYPERSD_HEARTBEAT_INTERVAL_S": "0.5",
        "HYPERSD_SERVED_MODELS": json.dumps(models),
        "HYPERSD_AUTH": "false",
        "HYPERSD_WORKER_METRICS_PORT": "0",
    }
    env |= {f"HYPERSD_{key.upper()}": str(value) for key, value in settings.items()}
    return env


def gateway(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    """`hypersd serve` (Redis mode) and its URL, once /healthz answers."""
    port = free_port()
    proc = Proc([sys.executable, "-m", "launcher", "serve", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"gateway exited:\n{log.read_text(errors='replace')}")
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200

    wait_until(up, 60, "hypersd serve")
    return proc, url


def worker(env: dict[str, str], model: str, log: Path) -> Proc:
    """`hypersd worker --model MODEL`."""
    return Proc([sys.executable, "-m", "launcher", "worker", "--model", model], env, log)


def live_workers(url: str, model: str) -> int:
    """Live workers of `model`, as the gateway's `GET /v1/models` reports them."""
    models = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
    return sum(entry["workers"] for entry in models if entry["id"] == model)
