"""Progress (issue 11): a job's queue position and step, in its status and as server-sent events
on `GET /v1/generations/{id}/events`, from a real gateway, Redis and Celery worker."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import redis
from serving_fixtures import MODEL, Server, Stack, serving_env, start_server

from jobs.progress import StepReporter
from jobs.redis_store import RedisJobStore

PROMPT = "a small orange circle on a white background"


def _events(url: str, timeout_s: float = 120) -> list[tuple[str, dict[str, object]]]:
    """The (event, job) pairs of a stream, read to its end."""
    events = []
    with httpx.stream("GET", url, timeout=timeout_s) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_events_stream_steps_of_a_running_job_and_end_with_it(stack: Stack) -> None:
    body = {"prompt": PROMPT, "model": MODEL, "steps": 50}
    job_id = httpx.post(f"{stack.server.url}/v1/generations", json=body, timeout=10).json()["id"]

    events = _events(f"{stack.server.url}/v1/generations/{job_id}/events")

    assert events[0][0] == "status"
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    steps = [job["step"] for name, job in events if job["status"] == "running"]
    assert any(0 < step < 50 for step in steps), events  # seen mid-run
    assert steps == sorted(steps)  # steps only go forward
    statuses = [job["status"] for name, job in events if name == "status"]
    assert statuses[-2:] == ["running", "succeeded"]
    assert events[-1][1]["step"] is None and events[-1][1]["queue_position"] is None


def test_events_of_an_unknown_job_are_a_404(stack: Stack) -> None:
    answer = httpx.get(f"{stack.server.url}/v1/generations/nope/events", timeout=10)
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found"


@pytest.fixture(scope="module")
def idle_gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway on a Redis database no worker reads: its jobs stay queued."""
    url = f"{redis_url}/13"
    redis.Redis.from_url(url).flushdb()
    server = start_server(serving_env(redis_url=url), tmp_path_factory.mktemp("idle") / "gw.log")
    yield server
    server.process.stop()
    redis.Redis.from_url(url).flushdb()


def test_queued_jobs_show_their_place_in_line(idle_gateway: Server) -> None:
    url = f"{idle_gateway.url}/v1/generations"
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    ids = [httpx.post(url, json=body, timeout=10).json()["id"] for _ in range(3)]
    positions = [httpx.get(f"{url}/{job_id}", timeout=10).json() for job_id in ids]
    assert [job["queue_position"] for job in positions] == [0, 1, 2]
    assert all(job["step"] is None for job in positions)

    assert httpx.post(f"{url}/{ids[0]}/cancel", timeout=10).status_code == 200
    assert httpx.get(f"{url}/{ids[2]}", timeout=10).json()["queue_position"] == 1
    # the stream of a queued job ends with its cancel
    httpx.post(f"{url}/{ids[1]}/cancel", timeout=10)
    events = _events(f"{url}/{ids[1]}/events", timeout_s=10)
    assert [(name, job["status"]) for name, job in events] == [("status", "canceled")]


def test_step_reports_are_throttled_but_the_last_step_always_lands(redis_url: str) -> None:
    client = redis.Redis.from_url(f"{redis_url}/12")
    store = RedisJobStore(client, ttl_s=60)
    reporter = StepReporter(store, ["a", "b", "a"], total=100, min_interval_s=60)
    for step in range(1, 101):
        reporter(step)
    assert reporter.writes == 2  # step 1, then the last step
    assert store.progress("a") == 100 and store.progress("b") == 100
    client.flushdb()
    client.close()


def test_a_one_step_batch_writes_no_progress(redis_url: str) -> None:
    client = redis.Redis.from_url(f"{redis_url}/12")
    store = RedisJobStore(client, ttl_s=60)
    reporter = StepReporter(store, ["a"], total=1)
    reporter(1)
    assert reporter.writes == 0 and store.progress("a") is None
    client.flushdb()
    client.close()
