"""SLA-aware admission and step choice by deadline (issue 11), over real parts.

The service-time estimates live in a real redis-server; workers report them (a real Celery worker,
and embedded mode's in-process ones). The admission tests run a real gateway over HTTP on a Redis
database of its own with no worker consuming: a heartbeat written here stands for a live worker
whose jobs do not move (as one busy with long jobs), so a queue filled over HTTP stays as deep as
the test makes it, and the estimates are seeded through `jobs.service_time`, as workers report
them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from serving_fixtures import (
    MODEL,
    SHIPPED_REGISTRY,
    Server,
    Stack,
    serving_env,
    start_server,
    wait_until,
)

from hypersd.contracts import GenerateRequest
from hypersd.registry import RegistryError, load_registry
from jobs.queue import CeleryQueue, create_celery
from jobs.record import resolve_request
from jobs.redis_store import RedisJobStore
from jobs.service_time import (
    CALIBRATION_RANGE,
    MemoryServiceTimes,
    RedisServiceTimes,
    batch_seconds,
    predict_seconds,
)
from jobs.settings import Settings
from jobs.store import WorkerInfo
from service.admission import Prediction, Predictor

PROMPT = "a small purple cross on a gray background"
SERIES = "shapes-hyper"
MEMBERS = load_registry(SHIPPED_REGISTRY).series(SERIES)  # 1, 2, 4, 8 steps and the teacher
# the models of the deadline tests (not in the series: their queues stay apart)
TIMED, COLD, ABSENT, SLA = (
    "shapes-tscd-2step",
    "shapes-tscd-4step",
    "shapes-lcm",
    "shapes-tscd-8step",
)
SLA_MS = 1000


# --- the estimates and the prediction, without a gateway --------------------------------------


def test_the_moving_mean_is_shared_through_redis_and_matches_memory(redis_url: str) -> None:
    """Two clients (two workers, or a worker and a gateway) fold into and read one estimate."""
    clients = [redis.Redis.from_url(f"{redis_url}/9") for _ in range(2)]
    clients[0].flushdb()
    shared = [RedisServiceTimes(client, alpha=0.5) for client in clients]
    memory = MemoryServiceTimes(alpha=0.5)
    for times, (size, seconds) in zip(
        [shared[0], shared[1], shared[0]], [(1, 1.0), (1, 2.0), (4, 3.0)], strict=True
    ):
        times.observe("m", 2, size, seconds)
        memory.observe("m", 2, size, seconds)
    assert shared[1].estimates("m", 2) == memory.estimates("m", 2) == {1: 1.5, 4: 3.0}
    assert shared[0].estimates("m", 4) == memory.estimates("m", 4) == {}  # per step count
    assert 0 < clients[0].ttl("hypersd:service_time:m:2") <= shared[0].ttl_s  # goes cold
    with pytest.raises(ValueError, match="finite"):
        shared[0].observe("m", 2, 1, float("nan"))
    for client in clients:
        client.close()


def test_the_calibration_follows_how_far_off_predictions_were(redis_url: str) -> None:
    client = redis.Redis.from_url(f"{redis_url}/9")
    client.flushdb()
    for times in (RedisServiceTimes(client, alpha=0.5), MemoryServiceTimes(alpha=0.5)):
        assert times.calibration("m") == 1.0  # nothing reported yet
        assert times.correct("m", 3.0) == 2.0  # finished 3x later than predicted: up
        assert times.correct("m", 0.5) == 1.5  # then 2x sooner: down by half the miss
        for _ in range(40):
            times.correct("m", 1000.0)
        assert times.calibration("m") == CALIBRATION_RANGE[1]  # bounded
        with pytest.raises(ValueError, match="positive"):
            times.correct("m", 0.0)
    client.close()


def test_an_estimate_not_refreshed_goes_cold() -> None:
    times = MemoryServiceTimes(ttl_s=0)
    times.observe("m", 1, 1, 0.5)
    assert times.estimates("m", 1) == {}


def test_batch_time_between_and_beyond_the_sizes_measured() -> None:
    measured = {2: 1.0, 6: 2.0}
    assert batch_seconds(measured, 4) == pytest.approx(1.5)  # on the line between
    assert batch_seconds(measured, 1) == 1.0  # fewer images: no faster than the smallest
    assert batch_seconds(measured, 12) == pytest.approx(4.0)  # no batching gain past 6
    with pytest.raises(ValueError, match="cold"):
        batch_seconds({}, 1)


def test_the_prediction_grows_with_the_queue_and_shrinks_with_workers() -> None:
    measured = {1: 0.5, 8: 2.0}

    def predict(ahead: int, workers: int = 1, images: int = 1) -> float | None:
        return predict_seconds(
            measured, images=images, jobs_ahead=ahead, workers=workers, max_batch_size=8
        )

    assert predict(0) == 0.5  # alone: one batch of one
    assert predict(7) == 2.0  # eight jobs: one full batch
    assert predict(15) == 4.0 and predict(15, workers=2) == 2.0
    assert predict(1, images=8) == 4.0  # two jobs of eight images: two batches
    assert predict_seconds({}, images=1, jobs_ahead=9, workers=1, max_batch_size=8) is None


def test_a_deadline_is_met_within_its_headroom_and_only_with_a_worker() -> None:
    assert Prediction("m", 1, 0.8).meets(1000) and not Prediction("m", 1, 0.8).meets(1000, 0.7)
    assert Prediction("m", 1, None).meets(1)  # cold: admitted
    assert not Prediction("m", 0, None).meets(60_000)  # no worker


def test_a_series_needs_distinct_steps_and_a_name_of_its_own(tmp_path: Path) -> None:
    entries = (
        'default = "a"\n'
        '[models.a]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\ndefault_steps = {a_steps}\n'
        'series = "{series}"\n'
        '[models.b]\nextends = "a"\nrecipe = "nstep-lora"\nsteps = [2]\ndefault_steps = 2\n'
        'series = "s"\n'
    )
    cases = [("s", 2, "distinct default_steps"), ("a", 25, "has the name of a model")]
    for series, a_steps, words in cases:
        (tmp_path / "r.toml").write_text(entries.format(series=series, a_steps=a_steps))
        with pytest.raises(RegistryError, match=words):
            load_registry(tmp_path / "r.toml")
    (tmp_path / "r.toml").write_text(entries.format(series="s", a_steps=25))
    assert [spec.name for spec in load_registry(tmp_path / "r.toml").series("s")] == ["b", "a"]


# --- workers report -----------------------------------------------------------------------------


def test_a_celery_worker_reports_each_batch_and_the_gateway_refuses_by_it(stack: Stack) -> None:
    times = RedisServiceTimes(redis.Redis.from_url(stack.redis_url))
    steps = 3  # a step count no other test runs: its estimate is this test's
    with httpx.Client(base_url=stack.server.url, timeout=60) as client:
        body = {"prompt": PROMPT, "model": MODEL, "steps": steps}
        cold = client.post("/v1/generations", json={**body, "deadline_ms": 1})
        assert cold.status_code == 202, cold.text  # no estimate yet: admitted
        assert cold.json()["predicted_seconds"] is None and cold.json()["deadline_ms"] == 1
        done = client.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
        assert done.json()["status"] == "succeeded", done.text
        estimates = times.estimates(MODEL, steps)
        assert estimates and all(seconds > 0 for seconds in estimates.values())
        refused = client.post("/v1/generations", json={**body, "deadline_ms": 1})
        assert times.calibration(MODEL) == 1.0
        # a job admitted with a prediction: the worker reports how far off it was
        timed = client.post(
            "/v1/generations", json={**body, "deadline_ms": 60_000}, headers={"Prefer": "wait=60"}
        )
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["predicted_ms"] > 1
    assert timed.json()["status"] == "succeeded" and timed.json()["predicted_seconds"] > 0
    # reported just after the job's end, off the answer's path: it lands within moments
    wait_until(lambda: times.calibration(MODEL) != 1.0, 10, "the worker's calibration report")
    times.redis.close()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("admission-embedded")
    env = serving_env(model="shapes-hyper-1step", slots=2, images_dir=folder / "images")
    server = start_server(env, folder / "server.log")
    yield server
    server.process.stop()


def test_embedded_workers_report_too_and_a_cold_model_is_admitted(embedded: Server) -> None:
    with httpx.Client(base_url=embedded.url, timeout=60) as client:
        body = {"prompt": PROMPT, "deadline_ms": 0.5}
        cold = client.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
        assert cold.status_code == 200 and cold.json()["status"] == "succeeded", cold.text
        refused = client.post("/v1/generations", json=body)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "deadline_unmet" and error["deadline_ms"] == 0.5
    assert error["predicted_ms"] > 0.5 and int(refused.headers["Retry-After"]) >= 1


# --- admission over HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway on Redis db 8 serving the series and the deadline tests' models; `SLA` has a
    registry default deadline (`sla_ms`) in a copy of the shipped registry."""
    folder = tmp_path_factory.mktemp("admission")
    registry = folder / "registry.toml"
    text = SHIPPED_REGISTRY.read_text().replace(
        f"[models.{SLA}]\n", f"[models.{SLA}]\nsla_ms = {SLA_MS}\n"
    )
    registry.write_text(text)
    redis.Redis.from_url(f"{redis_url}/8").flushdb()
    served = [spec.name for spec in MEMBERS] + [TIMED, COLD, ABSENT, SLA]
    # no headroom: the tests' deadlines compare with the predictions exactly
    env = serving_env(
        redis_url=f"{redis_url}/8",
        registry=registry,
        served_models=json.dumps(served),
        deadline_headroom=1,
    )
    server = start_server(env, folder / "gateway.log")
    yield server
    server.process.stop()


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisJobStore]:
    client = redis.Redis.from_url(f"{redis_url}/8")
    store = RedisJobStore(client, ttl_s=60)
    yield store
    store.close()
    client.close()


def _live_worker(store: RedisJobStore, model: str) -> None:
    """A heartbeat for `model` (a live worker whose jobs do not move), for the test's length."""
    info = WorkerInfo(
        id=f"{model}@test", model=model, backend="eager", capacity=4, busy=0, last_beat=time.time()
    )
    store.beat(info, ttl=120)


def _fill(client: httpx.Client, model: str, jobs: int) -> None:
    """Queue `jobs` jobs for `model` (no deadline: always admitted)."""
    for _ in range(jobs):
        made = client.post("/v1/generations", json={"prompt": PROMPT, "model": model})
        assert made.status_code == 202, made.text


MEASURED = {1: 0.4, 8: 1.6}  # seconds per batch of 1 and of 8 images (seeded)


def test_a_deadline_that_cannot_be_met_is_refused_at_once_with_the_predicted_wait(
    gateway: Server, store: RedisJobStore
) -> None:
    _live_worker(store, TIMED)
    times = RedisServiceTimes(store.redis)
    for size, seconds in MEASURED.items():
        times.observe(TIMED, 2, size, seconds)
    body = {"prompt": PROMPT, "model": TIMED, "deadline_ms": 1000}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        admitted = client.post("/v1/generations", json=body)
        assert admitted.status_code == 202, admitted.text  # alone: 0.4 s
        assert admitted.json()["predicted_seconds"] == pytest.approx(0.4)
        _fill(client, TIMED, 10)  # 11 jobs ahead now
        started = time.monotonic()
        refused = client.post("/v1/generations", json=body)
        took = time.monotonic() - started
    assert refused.status_code == 429, refused.text
    assert took < 0.5, f"refused after {took:.2f} s"
    expected = predict_seconds(MEASURED, images=1, jobs_ahead=11, workers=1, max_batch_size=8)
    assert expected is not None and expected > 1
    error = refused.json()["error"]
    assert error["type"] == "deadline_unmet" and error["deadline_ms"] == 1000
    assert error["predicted_ms"] == pytest.approx(expected * 1000, abs=0.1)
    assert int(refused.headers["Retry-After"]) == math.ceil(expected - 1)


def test_a_cold_model_is_admitted_and_one_without_a_worker_is_503(
    gateway: Server, store: RedisJobStore
) -> None:
    _live_worker(store, COLD)
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        cold = client.post(
            "/v1/generations", json={"prompt": PROMPT, "model": COLD, "deadline_ms": 1}
        )
        absent = client.post(
            "/v1/generations", json={"prompt": PROMPT, "model": ABSENT, "deadline_ms": 60_000}
        )
        undated = client.post("/v1/generations", json={"prompt": PROMPT, "model": ABSENT})
    assert cold.status_code == 202 and cold.json()["predicted_seconds"] is None, cold.text
    assert absent.status_code == 503 and absent.json()["error"]["type"] == "unavailable"
    assert "no live worker" in absent.json()["error"]["message"]
    assert int(absent.headers["Retry-After"]) >= 1
    assert undated.status_code == 202  # no deadline: it waits for a worker, as before


def test_the_registry_default_deadline_applies_and_a_request_replaces_it(
    gateway: Server, store: RedisJobStore
) -> None:
    _live_worker(store, SLA)
    RedisServiceTimes(store.redis).observe(SLA, 8, 1, 2.0)  # one job: 2 s, past the 1 s SLA
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        default = client.post("/v1/generations", json={"prompt": PROMPT, "model": SLA})
        longer = client.post(
            "/v1/generations", json={"prompt": PROMPT, "model": SLA, "deadline_ms": 3000}
        )
    assert default.status_code == 429 and default.json()["error"]["deadline_ms"] == SLA_MS
    assert longer.status_code == 202 and longer.json()["deadline_ms"] == 3000, longer.text


def _auto(client: httpx.Client, deadline_ms: float) -> httpx.Response:
    body = {"prompt": PROMPT, "model": SERIES, "steps": "auto", "deadline_ms": deadline_ms}
    return client.post("/v1/generations", json=body)


def test_steps_auto_picks_fewer_steps_as_the_queue_deepens(
    gateway: Server, store: RedisJobStore
) -> None:
    """A batch of any size costs 0.1 s a step here: the teacher (25 steps, 2.5 s) never meets a
    1 s deadline, 8 steps (0.8 s) do while their queue is short, and so on down."""
    times = RedisServiceTimes(store.redis)
    for spec in MEMBERS:
        _live_worker(store, spec.name)
        for size in (1, 8):
            times.observe(spec.name, spec.default_steps, size, 0.1 * spec.default_steps)
    model = {spec.default_steps: spec.name for spec in MEMBERS}
    # (jobs queued first for the model of `steps`, deadline in ms) -> the steps chosen
    plan = [
        ((8, 0), 1000, 8),  # queues empty: the most steps that fit
        ((8, 16), 1000, 4),  # 8 steps behind 17 jobs: 3 batches, 2.4 s
        ((4, 16), 1000, 2),  # 4 steps behind 17 jobs: 1.2 s
        ((1, 0), 150, 1),  # 2 steps behind one job: 0.2 s; 1 step: 0.1 s
    ]
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for (steps, jobs), deadline_ms, expected in plan:
            _fill(client, model[steps], jobs)
            made = _auto(client, deadline_ms)
            assert made.status_code == 202, made.text
            job: dict[str, Any] = made.json()
            assert (job["steps"], job["model"], job["series"]) == (
                expected,
                model[expected],
                SERIES,
            )
            assert job["predicted_seconds"] * 1000 <= deadline_ms
            assert job["deadline_ms"] == deadline_ms
        _fill(client, model[1], 16)  # 1 step behind 17 jobs: 0.3 s; 2 steps still 0.2 s
        refused = _auto(client, 150)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    # the wait told is the best member's: 2 steps behind one job
    assert error["type"] == "deadline_unmet" and error["predicted_ms"] == pytest.approx(200)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": TIMED, "steps": "auto", "deadline_ms": 1000}, "steps"),  # not a series
        ({"model": SERIES, "steps": "auto"}, "deadline_ms"),  # no deadline
        ({"model": SERIES, "steps": 4, "deadline_ms": 1000}, "steps"),  # a series: auto only
        ({"model": SERIES, "steps": "many", "deadline_ms": 1000}, "steps"),
        ({"model": TIMED, "deadline_ms": 0}, "deadline_ms"),
    ],
)
def test_wrong_uses_of_steps_auto_and_deadlines_are_422_naming_the_field(
    gateway: Server, body: dict[str, object], field: str
) -> None:
    response = httpx.post(f"{gateway.url}/v1/generations", json={"prompt": PROMPT, **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_the_spec_documents_deadlines_and_steps_auto(gateway: Server) -> None:
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    request = schemas["GenerateRequest"]["properties"]
    assert {"const": "auto", "type": "string"} in request["steps"]["anyOf"]
    assert "deadline_ms" in request
    assert {"steps", "series", "predicted_seconds"} <= set(schemas["Job"]["properties"])
    assert "predicted_ms" in schemas["ErrorDetail"]["properties"]
    responses = spec["paths"]["/v1/generations"]["post"]["responses"]
    assert {"429", "503", "422"} <= set(responses)


def test_on_a_shared_device_a_job_waits_for_every_models_work(redis_url: str) -> None:
    """Embedded mode's models share one process's device: the work queued for another model
    delays a job too (`Predictor.shared`); with a device per worker it does not."""
    url = f"{redis_url}/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RedisJobStore(client, ttl_s=60)
    queue = CeleryQueue(create_celery(Settings(redis_url=url)), client)
    times = RedisServiceTimes(client)
    registry = load_registry(SHIPPED_REGISTRY)
    one, eight = registry.get("shapes-hyper-1step"), registry.get("shapes-hyper-8step")
    for spec, seconds in ((one, 0.1), (eight, 0.8)):
        _live_worker(store, spec.name)
        times.observe(spec.name, spec.default_steps, 8, seconds)
    for _ in range(9):  # two batches of the 8-step model: 1.6 s
        queue.submit(resolve_request(GenerateRequest(prompt=PROMPT, model=eight.name), registry))
    own = Predictor(store, queue, times, max_batch_size=8)
    shared = Predictor(store, queue, times, max_batch_size=8, shared={one.name: 1, eight.name: 8})
    workers = own.workers()
    assert own.predict(one.name, 1, 1, workers).seconds == pytest.approx(0.1)
    assert shared.predict(one.name, 1, 1, workers).seconds == pytest.approx(0.1 + 1.6)
    store.close()
    client.flushdb()
    client.close()
