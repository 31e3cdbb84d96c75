"""Chaos proof (issue 11): under steady load, kill -9 workers mid-batch and restart Redis; no
accepted job may be lost.

A redis-server with AOF (`appendfsync always`), `hypersd serve` and two `hypersd worker`s (real
Celery workers). A client submits `--jobs` jobs at `--rate` per second; meanwhile, spread evenly
over the load, a worker that is running a job is killed -9 (and started again) `--kills` times,
and Redis is stopped (SIGTERM) and started again `--redis-restarts` times. Then every job answered
202 must reach a terminal state, and every succeeded one must have all its images. Printed as a
markdown table: accepted (202), refused (503 while Redis was down: the client knows, nothing to
lose), succeeded, failed, lost (accepted, never ended), redelivered (started more than once), and
the longest redelivery delay (a kill -> the job's restart on a live worker).

    .venv/bin/python -m bench.chaos --jobs 300 --rate 10 --steps 4 --out bench/results/chaos-cpu.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from bench.machine import describe_machine
from bench.processes import (
    Proc,
    free_port,
    gateway,
    hypersd_env,
    live_workers,
    redis_server,
    wait_until,
    worker,
)
from jobs.redis_store import RedisJobStore

MODEL = "shapes-base"
PROMPT = "a small orange circle on a white background"


@dataclass
class Chaos:
    """What the chaos thread did: kills (time, worker id, jobs it was running) and restarts."""

    kills: list[tuple[float, str, list[str]]] = field(default_factory=list)
    redis_restarts: int = 0
    errors: list[str] = field(default_factory=list)


def _worker_id(proc: Proc) -> str:
    """The id a worker gives itself (`worker.celery_app`): model@host.pid."""
    import socket

    return f"{MODEL}@{socket.gethostname()}.{proc.popen.pid}"


def _running_on(store: RedisJobStore, worker_id: str) -> list[str]:
    ids = []
    for job_id in store.running_jobs():
        record = store.get(job_id)
        if record is not None and record.worker == worker_id:
            ids.append(job_id)
    return ids


def _busy_worker(store: RedisJobStore, workers: list[Proc]) -> tuple[Proc, list[str]] | None:
    """A live worker running a job now (mid-batch), with its running jobs; None if none is."""
    for proc in workers:
        if proc.alive():
            running = _running_on(store, _worker_id(proc))
            if running:
                return proc, running
    return None


def _chaos(
    workers: list[Proc], redis_proc: Proc, store: RedisJobStore, args: argparse.Namespace
) -> Chaos:
    """Over the load's duration: kill -9 a worker that is running a job (then start it again)
    `kills` times and restart Redis `redis_restarts` times, evenly spaced."""
    done = Chaos()
    duration = args.jobs / args.rate
    events = [(duration * (k + 1) / (args.kills + 1), "kill") for k in range(args.kills)]
    events += [
        (duration * (k + 0.5) / args.redis_restarts, "redis") for k in range(args.redis_restarts)
    ]
    started = time.monotonic()
    for at, what in sorted(events):
        time.sleep(max(0.0, started + at - time.monotonic()))
        if what == "redis":
            redis_proc.stop()  # SIGTERM: AOF is fsynced on every write anyway
            time.sleep(1.0)
            redis_proc.start()
            wait_until(lambda: bool(store.redis.ping()), 30, "redis-server again")
            done.redis_restarts += 1
            continue
        busy = None
        deadline = time.monotonic() + 30  # both may be starting up: wait for one at work
        while busy is None and time.monotonic() < deadline:
            with suppress(redis.RedisError):
                busy = _busy_worker(store, workers)
            time.sleep(0.05)
        if busy is None:
            done.errors.append(f"no worker was running a job at {at:.0f} s")
            continue
        target, running = busy
        worker_id = _worker_id(target)
        target.kill()
        done.kills.append((time.time(), worker_id, running))
        target.start()
    return done


def _submit(client: httpx.Client, url: str, steps: int) -> tuple[int, str | None]:
    body = {"prompt": PROMPT, "model": MODEL, "steps": steps}
    try:
        answer = client.post(f"{url}/v1/generations", json=body)
    except httpx.HTTPError:
        return 0, None
    return answer.status_code, answer.json().get("id") if answer.status_code == 202 else None


def run(args: argparse.Namespace, folder: Path) -> tuple[str, int]:
    """The whole experiment; returns the markdown report and the number of lost jobs."""
    with ExitStack() as stack:
        port = free_port()
        redis_proc = redis_server(folder, port, aof=True)
        stack.callback(redis_proc.stop)
        client = redis.Redis(port=port, socket_timeout=5)
        store = RedisJobStore(client, ttl_s=3600)
        env = hypersd_env(
            f"redis://127.0.0.1:{port}/0", [MODEL], slots=2, max_batch_size=4, max_wait_ms=20
        )
        workers = [worker(env, MODEL, folder / f"worker{k}.log") for k in range(2)]
        for proc in workers:
            stack.callback(proc.stop)
        gw, url = gateway(env, folder / "gateway.log")
        stack.callback(gw.stop)
        wait_until(lambda: live_workers(url, MODEL) == 2, 240, "two workers")

        with ThreadPoolExecutor(1) as chaos_pool, ThreadPoolExecutor(16) as pool:
            chaos = chaos_pool.submit(_chaos, workers, redis_proc, store, args)
            http = httpx.Client(timeout=15)
            started = time.monotonic()
            futures = []
            for k in range(args.jobs):
                time.sleep(max(0.0, started + k / args.rate - time.monotonic()))
                futures.append(pool.submit(_submit, http, url, args.steps))
            answers = [future.result() for future in futures]
            chaos_done = chaos.result()
        accepted = [job_id for status, job_id in answers if job_id is not None]
        refused = Counter(status for status, job_id in answers if job_id is None)

        def all_ended() -> bool:
            return all(_ended(store, job_id) for job_id in accepted)

        with suppress(TimeoutError):  # the table says how many did not end
            wait_until(all_ended, args.drain_s, "every accepted job ending")
        records = {job_id: store.get(job_id) for job_id in accepted}
        statuses = Counter(
            "missing" if record is None else record.status.value for record in records.values()
        )
        lost = [job_id for job_id in accepted if not _ended(store, job_id)]
        images_missing = 0
        for job_id, record in records.items():
            if record is not None and record.status.value == "succeeded":
                for index in range(len(record.seeds)):
                    answer = http.get(f"{url}/v1/generations/{job_id}/images/{index}")
                    images_missing += answer.status_code != 200
        redelivered = [r for r in records.values() if r is not None and r.attempts > 1]
        delays = []
        for at, _, running in chaos_done.kills:
            for job_id in running:
                record = records.get(job_id)
                if record is not None and record.started_at is not None and record.attempts > 1:
                    delays.append(record.started_at - at)
        errors = Counter(
            record.error.type
            for record in records.values()
            if record is not None and record.error is not None
        )
    longest = f"{max(delays):.1f} s" if delays else "n/a"
    header = (
        "| accepted (202) | refused | succeeded | failed | lost | redelivered | "
        "longest redelivery delay | images missing | worker kills (-9) | Redis restarts |"
    )
    row = (
        f"| {len(accepted)} | {sum(refused.values())} {dict(refused) or ''} | "
        f"{statuses['succeeded']} | {statuses['failed']} {dict(errors) or ''} | {len(lost)} | "
        f"{len(redelivered)} | {longest} | {images_missing} | {len(chaos_done.kills)} | "
        f"{chaos_done.redis_restarts} |"
    )
    kills_mid_batch = sum(1 for _, _, running in chaos_done.kills if running)
    report = (
        f"`python -m bench.chaos --jobs {args.jobs} --rate {args.rate:g} --steps {args.steps} "
        f"--kills {args.kills} --redis-restarts {args.redis_restarts}` ({MODEL}, {args.steps} "
        f"steps; 2 workers x 2 slots; Redis AOF appendfsync always; {kills_mid_batch} of the "
        "kills hit a worker running a job)\n\n"
        f"{header}\n{'|---:' * 10}|\n{row}\n\n{describe_machine()}\n"
    )
    if lost:
        report += f"\nlost: {lost}\n"
    for error in chaos_done.errors:
        report += f"\nchaos: {error}\n"
    return report, len(lost)


def _ended(store: RedisJobStore, job_id: str) -> bool:
    try:
        record = store.get(job_id)
    except redis.RedisError:
        return False
    return record is not None and record.status.terminal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rate", type=float, default=10.0, help="jobs per second")
    parser.add_argument("--steps", type=int, default=8, help="steps per job (the teacher's)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--drain-s", type=float, default=600, help="how long jobs may take to end")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hypersd-chaos-") as folder:
        report, lost = run(args, Path(folder))
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
