"""Benchmark: where a lone request's end-to-end time goes, from the job's own timestamps.

    python -m bench.latency_breakdown [--model shapes-base] [--steps 1] [--requests 40]

Starts its own redis-server, `hypersd serve` (gateway only) and one `hypersd worker` on
loopback (the processes `bench.chaos` and `bench.load` use), sends `--requests` synchronous
requests one at a time (`Prefer: wait=`), and splits each by the job record's timestamps
(`created_at`, `started_at`, `finished_at`, written by the gateway and the worker on the same
machine's clock): client -> job stored (HTTP, validation, admission), stored -> claimed by the
worker (Celery publish and delivery), claimed -> finished (the pipeline call plus PNG encoding
and storing), finished -> response (the pub/sub wake-up, reading the job, HTTP). Prints a
markdown table of medians; the first five requests are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.machine import describe_machine
from bench.processes import (
    free_port,
    gateway,
    hypersd_env,
    live_workers,
    redis_server,
    wait_until,
    worker,
)

WARMUP = 5
PHASES = (
    ("client -> job stored (HTTP, validation, admission)", "request", "created_at"),
    ("job stored -> claimed by the worker (Celery)", "created_at", "started_at"),
    ("claimed -> finished (pipeline, PNG, store)", "started_at", "finished_at"),
    ("finished -> response (wake-up, read, HTTP)", "finished_at", "response"),
    ("end to end", "request", "response"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="shapes-base")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="hypersd-breakdown-"))
    port = free_port()
    processes = [redis_server(folder, port)]
    try:
        env = hypersd_env(f"redis://127.0.0.1:{port}/0", [args.model])
        gateway_proc, url = gateway(env, folder / "gateway.log")
        processes += [gateway_proc, worker(env, args.model, folder / "worker.log")]
        wait_until(lambda: live_workers(url, args.model) > 0, 180, f"a {args.model} worker")
        store = redis.Redis(port=port)
        body = {"prompt": "a red circle", "model": args.model, "steps": args.steps}
        samples: list[dict[str, float]] = []
        with httpx.Client(timeout=60) as client:
            for seed in range(args.requests + WARMUP):
                request = time.time()
                answer = client.post(
                    f"{url}/v1/generations",
                    json=body | {"seed": seed},
                    headers={"Prefer": "wait=30"},
                )
                response = time.time()
                answer.raise_for_status()
                record = json.loads(store.get(f"hypersd:job:{answer.json()['id']}") or "{}")
                samples.append(record | {"request": request, "response": response})
        print(describe_machine("cpu"))
        print(f"model {args.model}, {args.steps} step(s), {args.requests} requests, one at a time")
        print()
        print("| phase | median ms |")
        print("|---|---:|")
        for name, start, end in PHASES:
            spans = [s[end] - s[start] for s in samples[WARMUP:]]
            print(f"| {name} | {statistics.median(spans) * 1000:.2f} |")
    finally:
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    main()
