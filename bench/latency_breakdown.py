"""Benchmark: where a lone request's end-to-end time goes, from the job's own timestamps.

    python -m bench.latency_breakdown [--model shapes-base] [--steps 1] [--requests 40]

Starts its own redis-server, `hypersd serve` (gateway only) and one `hypersd worker` on
loopback (the processes `bench.chaos` and `bench.load` use), sends `--requests` synchronous
requests one at a time (`Prefer: wait=`), and splits each by the job record's timestamps
(`created_at`, `started_at`, `finished_at`, written by the gateway and the worker on the same
machine's clock): client -> job stored (HTTP, validation, admission), stored -> claimed by the
worker (Celery publish and delivery), claimed -> finished (the pipeline call plus PNG encoding
and storing), finished -> response (the pub/sub wake-up, reading the job, HTTP). The claimed ->
finished span is split further by the job's own `timings`: the pipeline call (its text encoding,
denoising and VAE decode) and the rest (handing the job to the batcher and back, PNG encoding,
storing the end), so the worker's bookkeeping is measured in the same run as the call it wraps;
the last row, each request's end to end minus its own pipeline call, is the serving overhead.
Prints a markdown table of medians; the first five requests are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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
# the pipeline's phases in a job's `timings` (what `JobRunner` records of its batch)
PIPELINE_PHASES = ("text_encoding", "denoising", "vae_decode")


def _split(sample: dict[str, Any]) -> dict[str, float]:
    """A job's claimed -> finished span as the pipeline call and the rest, in seconds."""
    pipeline = sum(sample["timings"][phase] for phase in PIPELINE_PHASES)
    return {
        "pipeline": pipeline,
        "rest": sample["finished_at"] - sample["started_at"] - pipeline,
    }


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
        samples: list[dict[str, Any]] = []
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
            if start == "started_at":
                splits = [_split(s) for s in samples[WARMUP:]]
                for part, label in (("pipeline", "the pipeline call"), ("rest", "the rest")):
                    seconds = statistics.median(split[part] for split in splits)
                    print(f"| - of which {label} | {seconds * 1000:.2f} |")
        # per request, so the pipeline call's own spread (a busy machine) does not count
        overhead = [s["response"] - s["request"] - _split(s)["pipeline"] for s in samples[WARMUP:]]
        median_ms = statistics.median(overhead) * 1000
        print(f"| serving overhead (end to end - the call) | {median_ms:.2f} |")
    finally:
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    main()
