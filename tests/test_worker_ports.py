"""Several workers on one host (one per GPU is the common case): each needs its own metrics port.

A second worker on a port already taken stops at once with a one-line error (before loading its
model), and with `--metrics-port` both run side by side, each with its own metrics.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import redis
from serving_fixtures import (
    MODEL,
    free_port,
    serving_env,
    start_process,
    start_worker,
    wait_until,
)

from jobs.redis_store import RedisJobStore

DATABASE = 7  # its own Redis database: these workers take no other test's jobs


def metrics_up(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 200


def test_two_workers_on_one_host_need_and_get_their_own_metrics_ports(
    redis_url: str, tmp_path: Path
) -> None:
    url = f"{redis_url}/{DATABASE}"
    port, other_port = free_port(), free_port()
    first = start_worker(url, tmp_path / "first.log", worker_metrics_port=port)
    clash = second = None
    try:
        wait_until(lambda: metrics_up(port), 90, "the first worker's metrics")
        # The same port again: a one-line error and exit code 2, without loading the model.
        env = serving_env(redis_url=url, worker_metrics_port=port)
        clash = start_process(["worker", "--model", MODEL], env, tmp_path / "clash.log")
        try:
            assert clash.popen.wait(60) == 2
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the clashing worker kept running:\n{clash.output()}") from None
        output = clash.output()
        assert f"metrics port {port} is in use" in output and "--metrics-port" in output
        assert "Traceback" not in output and "loaded and warmed up" not in output
        # Its own port (and a device, as one worker per GPU would name its own): both run. (Its
        # metrics answer before its model has loaded; the heartbeat says when it has.)
        args = ["worker", "--model", MODEL, "--metrics-port", str(other_port), "--device", "cpu"]
        second = start_process(args, env, tmp_path / "second.log")
        wait_until(lambda: metrics_up(other_port), 90, "the second worker's metrics")
        assert metrics_up(port)
        client = redis.Redis.from_url(url)
        store = RedisJobStore(client, ttl_s=60)
        try:
            wait_until(lambda: len(store.workers()) == 2, 90, "two live workers")
            assert {info.model for info in store.workers()} == {MODEL}
        finally:
            client.close()
    finally:
        for process in (first, clash, second):
            if process is not None:
                process.stop()
