"""Quotas and backpressure over real HTTP (issue 11): 429 with Retry-After, at once.

The gateway here has a Redis database of its own and no worker, so every job it takes stays
queued: in flight for its key and in its model's queue. Each limit is tested on a model and keys
of its own, so the limits do not meet.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from serving_fixtures import MODEL, Server, serving_env, start_server

from jobs.redis_store import RedisJobStore

PROMPT = "a small purple cross on a gray background"
KEYS = ("rate", "flight", "depth-a", "depth-b", "depth-c")
# the rate test spreads its jobs over models, so that no model's queue reaches its cap
RATE_MODELS = ("shapes-hyper-1step", "shapes-hyper-2step", "shapes-hyper-8step")
FLIGHT_MODEL, DEPTH_MODEL = MODEL, "shapes-hyper-4step"


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-{name}"}


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url = f"{redis_url}/3"
    redis.Redis.from_url(url).flushdb()
    keys = [
        {"name": name, "sha256": hashlib.sha256(f"sk-{name}".encode()).hexdigest()} for name in KEYS
    ]
    env = serving_env(
        redis_url=url,
        auth="true",
        api_keys=json.dumps(keys),
        served_models=json.dumps([*RATE_MODELS, FLIGHT_MODEL, DEPTH_MODEL]),
        rate_limit_per_s=0.5,
        rate_limit_burst=3,
        max_jobs_in_flight=2,
        max_queue_depth=4,
    )
    server = start_server(env, tmp_path_factory.mktemp("quotas") / "gateway.log")
    yield server
    server.process.stop()


def _post(client: httpx.Client, key: str, model: str, **headers: str) -> httpx.Response:
    body = {"prompt": PROMPT, "model": model, "steps": 1 if model == MODEL else None}
    return client.post("/v1/generations", json=body, headers={**_bearer(key), **headers})


def _assert_429(response: httpx.Response, words: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limited" and words in error["message"], error


def test_a_key_past_its_rate_is_refused_with_retry_after(gateway: Server) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for model in RATE_MODELS:  # the burst; canceled at once: the in-flight cap stays out
            made = _post(client, "rate", model)
            assert made.status_code == 202, made.text
            client.post(f"/v1/generations/{made.json()['id']}/cancel", headers=_bearer("rate"))
        started = time.monotonic()
        refused = _post(client, "rate", RATE_MODELS[0])
        assert time.monotonic() - started < 0.5  # refused at once, not queued
        _assert_429(refused, "jobs per second")
        assert int(refused.headers["Retry-After"]) <= 2  # one token at 0.5/s


def test_a_key_past_its_jobs_in_flight_is_refused_until_one_ends(gateway: Server) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        retry = {"Idempotency-Key": f"flight-{time.time_ns()}"}
        first = _post(client, "flight", FLIGHT_MODEL, **retry)
        second = _post(client, "flight", FLIGHT_MODEL)
        assert first.status_code == second.status_code == 202
        _assert_429(_post(client, "flight", FLIGHT_MODEL), "queued or running")
        # a retry of a job in flight makes no new job: it gets its job, not a 429
        again = _post(client, "flight", FLIGHT_MODEL, **retry)
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        client.post(f"/v1/generations/{first.json()['id']}/cancel", headers=_bearer("flight"))
        assert _post(client, "flight", FLIGHT_MODEL).status_code == 202


def test_a_full_model_queue_refuses_every_key(gateway: Server) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for key in ("depth-a", "depth-a", "depth-b", "depth-b"):
            assert _post(client, key, DEPTH_MODEL).status_code == 202
        # depth-c has no job in flight: the queue's cap refuses it
        _assert_429(_post(client, "depth-c", DEPTH_MODEL), "queue of 'shapes-hyper-4step' is full")


def test_gateway_replicas_share_one_token_bucket_per_key(redis_url: str) -> None:
    """Two stores (two gateways' Redis clients) draw from the same bucket."""
    clients = [redis.Redis.from_url(f"{redis_url}/3") for _ in range(2)]
    replicas = [RedisJobStore(client, ttl_s=60) for client in clients]
    bucket = f"shared-{time.time_ns()}"
    assert replicas[0].take_token(bucket, 0.5, 2) == 0
    assert replicas[1].take_token(bucket, 0.5, 2) == 0
    wait_s = replicas[0].take_token(bucket, 0.5, 2)
    assert 1.5 < wait_s <= 2
    for store, client in zip(replicas, clients, strict=True):
        store.close()
        client.close()
