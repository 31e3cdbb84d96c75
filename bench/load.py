"""Load: a sustained rate, 3x overload answered by fast 429s, `steps: "auto"` under overload, and
memory over many requests.

    python -m bench.load [--mode redis|embedded] [--duration 20] [--load 0.6]
                         [--deadline-ms 1500] [--slots 8] [--threads 1]
                         [--memory-requests 10000] [--out FILE]

Starts the service on free loopback ports, serving the `shapes-hyper` series (1, 2, 4 and 8 steps,
and the 25-step teacher): in Redis mode (default) a redis-server, one `hypersd worker` per model
and a `hypersd serve` gateway, told that the workers share one device (this machine's CPU); in
embedded mode one `hypersd serve` holding gateway and models. An open-loop asyncio + httpx client
sends requests on a fixed schedule whatever the answers, as independent users do, each waiting
for its job (`Prefer: wait`). Phases:

1. warm-up: every model runs a few jobs (their service-time estimates exist; a cold model is
   admitted without a prediction), then a closed loop of `--slots` concurrent jobs of
   `--model` (default: the 8-step one, so that the model, not HTTP, is the bottleneck on a small
   machine) measures its capacity C (jobs/s);
2. sustained: jobs of `--model` with `deadline_ms` at `--load` x C;
3. overload: 3x the sustained rate, with the deadline (the service answers 429 at once for what
   it cannot finish in time), then without it (for contrast: latency grows instead);
4. `{"model": "shapes-hyper", "steps": "auto"}` with the deadline, at a third of the sustained
   rate, at it and at 3x: the share meeting the deadline and the steps chosen;
5. memory: the RSS of the gateway and the 1-step worker (embedded: the one process) before and
   after `--memory-requests` 1-step requests with the deadline at `--memory-rate` (0 skips it).

Prints markdown tables (the client runs on the same machine, so the numbers include its share of
the CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.machine import describe_machine
from hypersd.registry import load_registry

PROMPT = "a large red circle in the center on a white background"
REPO = Path(__file__).resolve().parent.parent
SERIES = "shapes-hyper"
FAST = "shapes-hyper-1step"  # the model of the memory phase: the series' cheapest
WAIT_S = 60  # `Prefer: wait`: how long a request holds for its job


@dataclass
class Deployment:
    """What the load runs against: the gateway's URL and the processes whose memory is read."""

    url: str
    pids: dict[str, int]


@dataclass
class Answer:
    """One request's outcome, timed by the client."""

    status: int
    seconds: float
    job: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == 200 and self.job.get("status") == "succeeded"


def _percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _share(part: int, whole: int) -> str:
    return "-" if whole == 0 else f"{100 * part / whole:.1f}%"


def _rss_mib(pid: int) -> float:
    """Resident memory of process `pid`, in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _until(check: Callable[[], bool], what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 600
    while not _safely(check):
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited ({proc.args})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready in 600 s")
        time.sleep(0.2)


def _safely(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except (OSError, httpx.HTTPError, redis.RedisError):
        return False


@contextmanager
def _started(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        popen = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield popen
    finally:
        popen.terminate()
        try:
            popen.wait(60)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


@contextmanager
def _deployment(args: argparse.Namespace, models: list[str], logs: Path) -> Iterator[Deployment]:
    """Embedded: one `hypersd serve` holding every model. Redis: a redis-server, one `hypersd
    worker` per model and a `hypersd serve` gateway (told the workers share this machine's CPU)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HYPERSD_")}
    env.pop("REDIS_URL", None)
    env |= {
        "HYPERSD_AUTH": "false",
        "HYPERSD_SLOTS": str(args.slots),
        "HYPERSD_MAX_BATCH_SIZE": str(args.slots),
        # fresh heartbeats: admission counts the jobs each model's slots hold from them
        "HYPERSD_HEARTBEAT_INTERVAL_S": "0.25",
        "HYPERSD_TORCH_THREADS": str(args.threads),
        "OMP_NUM_THREADS": str(args.threads),
        "HYPERSD_WORKER_METRICS_PORT": "0",
    }
    cli = [sys.executable, "-m", "launcher"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [*cli, "serve", "--port", str(port)]
    with ExitStack() as stack:
        if args.mode == "embedded":
            env["HYPERSD_EMBEDDED_MODELS"] = json.dumps(models)
            gateway = stack.enter_context(_started(serve, env, logs / "server.log"))
            _until(lambda: httpx.get(f"{url}/healthz").status_code == 200, "server", [gateway])
            yield Deployment(url, {"gateway + workers (one process)": gateway.pid})
            return
        redis_port = _free_port()
        redis_server = [args.redis_server, "--port", str(redis_port), "--save", ""]
        procs = [stack.enter_context(_started(redis_server, env, logs / "redis.log"))]
        env |= {
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "HYPERSD_SERVED_MODELS": json.dumps(models),
            "HYPERSD_SHARED_DEVICE": "true",
        }
        for model in models:
            worker = [*cli, "worker", "--model", model]
            procs.append(stack.enter_context(_started(worker, env, logs / f"{model}.log")))
        procs.append(stack.enter_context(_started(serve, env, logs / "gateway.log")))

        def ready() -> bool:
            listed = httpx.get(f"{url}/v1/models").json()["data"]
            return all(m["workers"] > 0 for m in listed if m["id"] in models)

        _until(ready, "gateway and workers", procs)
        pids = {"gateway": procs[-1].pid, f"worker {FAST}": procs[1 + models.index(FAST)].pid}
        yield Deployment(url, pids)


async def _post(client: httpx.AsyncClient, body: dict[str, Any]) -> Answer:
    started = time.perf_counter()
    response = await client.post("/v1/generations", json=body, headers={"Prefer": f"wait={WAIT_S}"})
    seconds = time.perf_counter() - started
    job = response.json() if response.status_code in (200, 202) else {}
    return Answer(response.status_code, seconds, job)


async def _drain(client: httpx.AsyncClient, answers: list[Answer]) -> None:
    """Wait until the jobs still running after their request gave up have ended, so a phase's
    backlog does not slow the next one."""
    for answer in answers:
        if answer.status == 202:
            while True:
                job = (await client.get(f"/v1/generations/{answer.job['id']}")).json()
                if job["status"] not in ("queued", "running"):
                    break
                await asyncio.sleep(0.5)


async def open_loop(
    client: httpx.AsyncClient, rate: float, duration_s: float, body: dict[str, Any]
) -> list[Answer]:
    """Send `body` at `rate` requests/s for `duration_s` on a fixed schedule; every answer."""
    count = max(1, round(rate * duration_s))
    start = time.perf_counter()
    tasks = []
    for index in range(count):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_post(client, {**body, "seed": index})))
    answers = list(await asyncio.gather(*tasks))
    await _drain(client, answers)
    return answers


async def closed_loop(
    client: httpx.AsyncClient, concurrency: int, requests: int, body: dict[str, Any]
) -> float:
    """Jobs/s of `requests` jobs sent `concurrency` at a time (the capacity)."""
    queue = iter(range(requests))

    async def user() -> None:
        for index in queue:
            answer = await _post(client, {**body, "seed": index})
            if not answer.finished:
                raise RuntimeError(f"warm-up job: {answer.status} {answer.job}")

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return requests / (time.perf_counter() - start)


def _accuracy(answers: list[Answer]) -> str:
    """Median of finish / predicted finish over the finished jobs admitted with a prediction."""
    ratios = [
        a.seconds / a.job["predicted_seconds"]
        for a in answers
        if a.finished and a.job.get("predicted_seconds")
    ]
    median = _percentile(ratios, 50)
    return "-" if median is None else f"{median:.2f}"


def _rate_row(label: str, rate: float, answers: list[Answer], deadline_ms: float | None) -> str:
    accepted = [a for a in answers if a.status in (200, 202)]
    refused = [a for a in answers if a.status == 429]
    other = len(answers) - len(accepted) - len(refused)
    seconds = [a.seconds for a in accepted]
    met = "-"
    if deadline_ms is not None:
        met = _share(
            sum(a.finished and a.seconds * 1000 <= deadline_ms for a in accepted), len(accepted)
        )
    return (
        f"| {label} | {rate:.1f} | {len(answers)} | {_share(len(refused), len(answers))} "
        f"| {_ms(_percentile(seconds, 50))} | {_ms(_percentile(seconds, 99))} "
        f"| {_ms(_percentile([a.seconds for a in refused], 99))} | {met} "
        f"| {_accuracy(answers)} | {other} |"
    )


def _series_row(rate: float, answers: list[Answer], deadline_ms: float, steps: list[int]) -> str:
    accepted = [a for a in answers if a.status in (200, 202)]
    refused = sum(a.status == 429 for a in answers)
    met = sum(a.finished and a.seconds * 1000 <= deadline_ms for a in accepted)
    chosen = Counter(a.job.get("steps") for a in accepted)
    histogram = " | ".join(str(chosen.get(s, 0)) for s in steps)
    return (
        f"| {rate:.1f} | {len(answers)} | {_share(refused, len(answers))} "
        f"| {_share(met, len(answers))} | {_share(met, len(accepted))} "
        f"| {_ms(_percentile([a.seconds for a in accepted], 99))} | {_accuracy(answers)} "
        f"| {histogram} | {refused} |"
    )


async def run(args: argparse.Namespace, deployment: Deployment, steps: list[int]) -> list[str]:
    registry = load_registry()
    lines: list[str] = []
    # idle connections closed before uvicorn closes them (after 5 s), so none is reused as it closes
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200, keepalive_expiry=2)
    async with httpx.AsyncClient(
        base_url=deployment.url, timeout=WAIT_S + 30, limits=limits
    ) as client:
        # 1. warm-up: each member's estimate, then the capacity of the rate phases' model
        for spec in registry.series(SERIES):
            for index in range(3):
                body = {"prompt": PROMPT, "model": spec.name, "seed": index}
                answer = await _post(client, body)
                if not answer.finished:
                    raise RuntimeError(f"warm-up of {spec.name}: {answer.status} {answer.job}")
        fast = {"prompt": PROMPT, "model": args.model}
        capacity = await closed_loop(client, args.slots, 10 * args.slots, fast)
        sustained = args.load * capacity
        deadline = {**fast, "deadline_ms": args.deadline_ms}
        lines += [
            f"Capacity of `{args.model}` (closed loop, {args.slots} concurrent jobs): "
            f"{capacity:.1f} jobs/s; "
            f"sustained rate = {args.load:g} x capacity; deadline {args.deadline_ms:g} ms; "
            f"{args.duration:g} s per phase.",
            "",
            "| phase | offered req/s | sent | 429 share | p50 accepted ms | p99 accepted ms "
            "| p99 of 429 ms | accepted within deadline | finish / predicted (p50) | other |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        # 2-3. sustained, then 3x with and without a deadline
        phases = [
            ("sustained, deadline", sustained, deadline, args.deadline_ms),
            ("3x overload, deadline (admission)", 3 * sustained, deadline, args.deadline_ms),
            ("3x overload, no deadline", 3 * sustained, fast, None),
        ]
        for label, rate, body, deadline_ms in phases:
            answers = await open_loop(client, rate, args.duration, body)
            lines.append(_rate_row(label, rate, answers, deadline_ms))
            print(lines[-1], file=sys.stderr, flush=True)
        # 4. the series, steps chosen by deadline
        auto = {"prompt": PROMPT, "model": SERIES, "steps": "auto", "deadline_ms": args.deadline_ms}
        lines += [
            "",
            f'`{{"model": "{SERIES}", "steps": "auto", "deadline_ms": {args.deadline_ms:g}}}`:',
            "",
            "| offered req/s | sent | 429 share | met deadline (of sent) | met deadline (of "
            "accepted) | p99 accepted ms | finish / predicted (p50) | "
            + " | ".join(f"{s} steps" for s in steps)
            + " | refused |",
            "|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(steps) + 1),
        ]
        for rate in (sustained / 3, sustained, 3 * sustained):
            answers = await open_loop(client, rate, args.duration, auto)
            lines.append(_series_row(rate, answers, args.deadline_ms, steps))
            print(lines[-1], file=sys.stderr, flush=True)
        # 5. memory over many requests to the 1-step model (with the deadline: many fast 429s)
        if args.memory_requests:
            before = {name: _rss_mib(pid) for name, pid in deployment.pids.items()}
            rate = args.memory_rate
            body = {"prompt": PROMPT, "model": FAST, "deadline_ms": args.deadline_ms}
            answers = await open_loop(client, rate, args.memory_requests / rate, body)
            done = sum(a.finished for a in answers)
            lines += [
                "",
                f"Memory over {len(answers)} requests to `{FAST}` at {rate:g}/s with the deadline "
                f"({done} generated, the rest refused):",
                "",
                "| process | RSS before MiB | RSS after MiB | growth |",
                "|---|---:|---:|---:|",
            ]
            for name, pid in deployment.pids.items():
                after = _rss_mib(pid)
                growth = after - before[name]
                lines.append(
                    f"| {name} | {before[name]:.0f} | {after:.0f} "
                    f"| {growth:+.0f} MiB ({100 * growth / before[name]:+.1f}%) |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=20, help="seconds per phase")
    parser.add_argument("--load", type=float, default=0.6, help="sustained rate / capacity")
    parser.add_argument("--deadline-ms", type=float, default=1500)
    parser.add_argument("--slots", type=int, default=8, help="task slots = max batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--model", default="shapes-hyper-8step", help="of the rate phases")
    parser.add_argument("--memory-requests", type=int, default=10_000, help="0: skip")
    parser.add_argument("--memory-rate", type=float, default=80, help="requests/s")
    parser.add_argument("--mode", choices=["redis", "embedded"], default="redis")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--out", type=Path, help="also write the tables here")
    args = parser.parse_args()

    members = load_registry().series(SERIES)
    steps = [spec.default_steps for spec in members]
    logs = Path(tempfile.mkdtemp(prefix="hypersd-load-"))
    with _deployment(args, [spec.name for spec in members], logs) as deployment:
        started = time.perf_counter()
        lines = asyncio.run(run(args, deployment, steps))
        took = time.perf_counter() - started
    where = (
        "Embedded mode: `hypersd serve` with no Redis, the gateway and the models in one process"
        if args.mode == "embedded"
        else "Redis mode: a redis-server, one `hypersd worker` (Celery) per model and a "
        "`hypersd serve` gateway with `HYPERSD_SHARED_DEVICE=true` (the workers share this "
        "machine's CPU), each its own process"
    )
    header = [
        "# Load: sustained rate, 3x overload, steps auto, memory",
        "",
        f"Machine: {describe_machine()}; shared with other work while measured (load varies).",
        f"{where}, on loopback, serving the series `{SERIES}` "
        f"({', '.join(m.name for m in members)}) with {args.slots} task slots and max batch "
        f"{args.slots} per model and {args.threads} torch thread(s) per model; the asyncio + "
        "httpx client runs on the same machine. "
        f"`python -m bench.load --mode {args.mode} --duration {args.duration:g} --load "
        f"{args.load:g} --deadline-ms {args.deadline_ms:g} --slots {args.slots} --threads "
        f"{args.threads} --model {args.model} --memory-requests {args.memory_requests} "
        f"--memory-rate {args.memory_rate:g}` ({took:.0f} s; logs {logs}).",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
