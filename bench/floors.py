"""Benchmark: the floors under a served request, each part measured empty and alone.

    python -m bench.floors [--repeats 200]

The serving overhead (`bench.serving`, `bench.latency_breakdown`) is made of parts the product is
built from: an HTTP round trip through the gateway, a Redis round trip, a Celery publish and the
hop to a worker's task slot. This measures each with no model behind it, on its own redis-server
and gateway (the processes `bench.chaos` and `bench.load` use) and a Celery worker configured as
hypersd's (`jobs.queue.create_celery`, thread pool, acks_late) whose task does nothing but report
when it started. Prints a markdown table of medians and minima; the first 10 of each are warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from celery import Celery

from bench.machine import describe_machine
from bench.processes import REPO, free_port, gateway, hypersd_env, redis_server
from jobs.queue import create_celery
from jobs.settings import Settings

_QUEUE = "floors"
_TASK = "floors.started"
_STARTED = "floors:started"  # the Redis list the empty task pushes its (sent, started) times to
_WARMUP = 10


def _celery(redis_url: str) -> Celery:
    """hypersd's Celery app with one task that only records when it started."""
    app = create_celery(Settings(redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)

    @app.task(name=_TASK)
    def started(sent: float) -> None:
        client.rpush(_STARTED, json.dumps([sent, time.time()]))

    return app


def _celery_worker(redis_url: str) -> None:
    """The worker process: hypersd's pool options, this module's empty task."""
    _celery(redis_url).worker_main(
        [
            "worker",
            "--pool=threads",
            "--concurrency=4",
            f"--queues={_QUEUE}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ]
    )


def _timed(call: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per `call`, warm-up dropped."""
    seconds = []
    for _ in range(repeats + _WARMUP):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds[_WARMUP:]


def _row(part: str, seconds: list[float]) -> str:
    return f"| {part} | {statistics.median(seconds) * 1e3:.2f} | {min(seconds) * 1e3:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="measurements per part")
    parser.add_argument("--celery-worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.celery_worker:
        _celery_worker(args.celery_worker)
        return

    folder = Path(tempfile.mkdtemp(prefix="hypersd-floors-"))
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    store = redis_server(folder, port)
    rows = []
    try:
        client = redis.Redis.from_url(redis_url)
        rows.append(_row("Redis PING round trip", _timed(client.ping, args.repeats)))

        env = hypersd_env(redis_url, ["shapes-base"])
        server, url = gateway(env, folder / "gateway.log")
        try:
            body = {"prompt": "a red circle in the center", "model": "shapes-base", "steps": 1}
            with httpx.Client(base_url=url, timeout=60) as http:
                healthz = _timed(lambda: http.get("/healthz"), args.repeats)
                rows.append(_row("HTTP `GET /healthz` through the gateway", healthz))

                def queue_a_job() -> None:
                    # no worker, no deadline: the job is stored, published and stays queued
                    answer = http.post("/v1/generations", json=body)
                    if answer.status_code != 202:
                        raise RuntimeError(f"POST answered {answer.status_code}: {answer.text}")

                posts = _timed(queue_a_job, args.repeats)
                rows.append(_row("`POST /v1/generations`, no worker (to the job queued)", posts))
        finally:
            server.stop()

        app = _celery(redis_url)
        sends = _timed(lambda: app.send_task(_TASK, args=[time.time()], queue=_QUEUE), args.repeats)
        rows.append(_row("Celery `send_task`", sends))
        client.delete(_QUEUE)  # those tasks were only timed being sent
        command = [sys.executable, "-m", "bench.floors", "--celery-worker", redis_url]
        with (folder / "celery.log").open("wb") as log:
            celery_worker = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
        try:
            hops, busy_sends = [], []
            for index in range(args.repeats + _WARMUP):
                sent_at = time.perf_counter()
                app.send_task(_TASK, args=[time.time()], queue=_QUEUE)
                send_seconds = time.perf_counter() - sent_at
                reply = client.blpop([_STARTED], timeout=60)
                if reply is None:
                    raise TimeoutError(f"the Celery worker started no task; see {folder}")
                sent, started = json.loads(reply[1])
                if index >= _WARMUP:
                    hops.append(started - sent)
                    busy_sends.append(send_seconds)
                time.sleep(0.01)  # one at a time, as a lone request is
            rows.append(_row("Celery `send_task`, a worker consuming the queue", busy_sends))
            rows.append(_row("empty Celery task, publish → start (thread pool, acks_late)", hops))
        finally:
            celery_worker.terminate()
            celery_worker.wait(30)
    finally:
        store.stop()

    print(describe_machine("cpu"))
    print(f"{args.repeats} measurements per part, one at a time\n")
    print("| part | median ms | min ms |\n|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
