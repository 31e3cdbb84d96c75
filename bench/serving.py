"""Benchmark: a direct pipeline call against end-to-end HTTP -> Redis -> Celery.

    python -m bench.serving [--model NAME] [--steps N] [--requests 40] [--concurrency 1,4,16]
                            [--threads N] [--redis-server /usr/bin/redis-server]

The model defaults to the registry's default, the steps to that model's default steps (the README's
table names `--model shapes-base --steps 1`, what it was measured on).

Starts its own redis-server, `hypersd serve` (gateway only) and `hypersd worker` processes on free
ports, first with micro-batching on (max batch = the highest concurrency) and then off (max batch
1), with as many task slots as the highest concurrency either way. Requests are synchronous
(`Prefer: wait=`), timed by the client. Prints the machine and a markdown table: p50/p99 latency
at concurrency 1 and images/s at each concurrency, with the ratios the serving goals name
(end-to-end p50 <= 1.15x the direct call; batching >= 1.5x images/s at concurrency 16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

from bench.machine import describe_machine
from bench.processes import free_port, wait_until
from hypersd.registry import load_registry

PROMPT = "a large red circle in the center on a white background"
REPO = Path(__file__).resolve().parent.parent


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        popen = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield popen
    finally:
        popen.terminate()
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _measure(
    call: Callable[[int], None], requests: int, concurrency: int
) -> tuple[list[float], float]:
    """Latencies of `requests` calls made `concurrency` at a time, and the wall time."""
    latencies: list[float] = []

    def timed(index: int) -> None:
        start = time.perf_counter()
        call(index)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, range(requests)))
    return latencies, time.perf_counter() - start


def _direct(args: argparse.Namespace) -> tuple[list[float], float, str]:
    import torch

    from hypersd.pipeline import ImageRequest, load
    from hypersd.registry import load_registry

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_registry().get(args.model)
    generator = load(spec)

    def call(index: int) -> None:
        generator.generate([ImageRequest(PROMPT, index)], steps=args.steps)

    for index in range(3):
        call(index)
    latencies, wall = _measure(call, args.requests, 1)
    device = f"{generator.pipe.device}, torch threads {torch.get_num_threads()}"
    if generator.pipe.device.type == "cuda":
        device += f", {torch.cuda.get_device_name(generator.pipe.device)}"
    return latencies, wall, device


def _end_to_end(
    args: argparse.Namespace, redis_url: str, max_batch_size: int, logs: Path
) -> dict[int, tuple[list[float], float]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HYPERSD_")}
    env |= {
        "REDIS_URL": redis_url,
        "HYPERSD_SLOTS": str(max(args.concurrency)),
        "HYPERSD_MAX_BATCH_SIZE": str(max_batch_size),
        "HYPERSD_MAX_WAIT_MS": str(args.max_wait_ms),
        "HYPERSD_WORKER_METRICS_PORT": "0",
        # A gateway on loopback for this run only: no API keys to configure.
        "HYPERSD_AUTH": "false",
    }
    if args.model:
        env["HYPERSD_MODEL"] = args.model
    # /readyz waits for a worker for this one model only
    env["HYPERSD_SERVED_MODELS"] = json.dumps([args.model or load_registry().default])
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "HYPERSD_TORCH_THREADS": str(args.threads)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "launcher"]
    with (
        _process([*cli, "worker"], env, logs / f"worker-{max_batch_size}.log"),
        _process([*cli, "serve", "--port", str(port)], env, logs / "gateway.log"),
        httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client,
    ):
        wait_until(lambda: client.get("/readyz").status_code == 200, 180, "gateway and worker")

        def call(index: int) -> None:
            body = {"prompt": PROMPT, "steps": args.steps, "seed": index}
            if args.model:
                body["model"] = args.model
            response = client.post("/v1/generations", json=body, headers={"Prefer": "wait=120"})
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")

        for index in range(3):
            call(index)
        return {c: _measure(call, args.requests, c) for c in args.concurrency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="registry name (default: the registry's default)")
    parser.add_argument("--steps", type=int, help="default: the model's default steps")
    parser.add_argument("--requests", type=int, default=40, help="requests per measurement")
    parser.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, help="torch threads, direct and worker alike")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = load_registry().get(args.model).default_steps

    direct, direct_wall, device = _direct(args)
    logs = Path(tempfile.mkdtemp(prefix="hypersd-bench-"))
    port = free_port()
    redis_args = [args.redis_server, "--port", str(port), "--save", "", "--appendonly", "no"]
    with _process(
        [*redis_args, "--maxmemory-policy", "noeviction"], dict(os.environ), logs / "redis.log"
    ):
        redis_url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: bool(redis.Redis.from_url(redis_url).ping()), 10, "redis-server")
        batched = _end_to_end(args, redis_url, max(args.concurrency), logs)
        unbatched = _end_to_end(args, redis_url, 1, logs)

    print(describe_machine())
    print(f"device {device}; {args.steps} step(s), {args.requests} requests per row; logs {logs}")
    print()
    print("| path | concurrency | p50 s | p99 s | images/s | vs direct (p50) | batching on/off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    p50_direct = statistics.median(direct)
    print(
        f"| direct call | 1 | {p50_direct:.4f} | {_percentile(direct, 99):.4f} "
        f"| {args.requests / direct_wall:.1f} | 1.00x | |"
    )
    for label, results in (
        ("HTTP+Redis+Celery, batching on", batched),
        ("batching off", unbatched),
    ):
        for concurrency, (latencies, wall) in results.items():
            ratio = statistics.median(latencies) / p50_direct
            speedup = (
                (unbatched[concurrency][1] / batched[concurrency][1])
                if results is batched
                else None
            )
            print(
                f"| {label} | {concurrency} | {statistics.median(latencies):.4f} "
                f"| {_percentile(latencies, 99):.4f} | {args.requests / wall:.1f} | {ratio:.2f}x "
                f"| {'' if speedup is None else f'{speedup:.2f}x'} |"
            )


if __name__ == "__main__":
    main()
