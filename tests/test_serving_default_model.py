"""The registry's default model over HTTP -> Redis -> Celery, deployed the plain way.

`hypersd worker` without `--model` serves the registry's default (the distilled model), and a
request naming no model is answered by it at its default steps. Runs on a Redis database of its
own, so the session's worker (for the teacher) cannot take these jobs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from serving_fixtures import (
    MODEL,
    SHIPPED_REGISTRY,
    Process,
    Server,
    serving_env,
    start_server,
    start_worker,
    wait_ready,
)

from hypersd.recipes import format_steps
from hypersd.registry import load_registry

PROMPT = "a small blue triangle to the left of a large yellow square on a black background"
DEFAULT = load_registry(SHIPPED_REGISTRY).get()  # the registry's default model


@dataclass
class Deployment:
    server: Server
    worker: Process


@pytest.fixture(scope="module")
def deployment(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("default-model")
    url = f"{redis_url}/2"
    served = json.dumps([DEFAULT.name])
    worker = start_worker(url, logs / "worker.log", model=None, slots=2)
    server = start_server(serving_env(redis_url=url, served_models=served), logs / "gateway.log")
    try:
        wait_ready(server, [DEFAULT.name])
        yield Deployment(server, worker)
    finally:
        worker.stop()
        server.process.stop()


def test_a_worker_started_without_a_model_serves_the_registry_default(
    deployment: Deployment,
) -> None:
    assert DEFAULT.name != MODEL and DEFAULT.loras, "the shipped default is the distilled model"
    models = httpx.get(f"{deployment.server.url}/v1/models").json()["data"]
    serving = {model["id"]: model["workers"] for model in models if model["served"]}
    assert serving == {DEFAULT.name: 1}


def test_a_request_naming_no_model_is_answered_by_the_default(deployment: Deployment) -> None:
    """Neither model nor steps: the default model at its default steps (the same image as
    naming both, since an image depends only on its prompt, seed and settings)."""
    body = {"prompt": PROMPT, "seed": 1, "response_format": "b64_json"}
    named = {**body, "model": DEFAULT.name, "steps": DEFAULT.default_steps}
    images = []
    for request in (body, named):
        response = httpx.post(
            f"{deployment.server.url}/v1/generations",
            json=request,
            headers={"Prefer": "wait=60"},
            timeout=90,
        )
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded" and job["model"] == DEFAULT.name, job
        images.append(job["images"][0]["b64_json"])
    assert images[0] == images[1]


def test_the_teacher_is_refused_where_no_worker_serves_it(deployment: Deployment) -> None:
    body = {"prompt": PROMPT, "model": MODEL, "steps": 25}
    response = httpx.post(f"{deployment.server.url}/v1/generations", json=body, timeout=30)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "model" and error["allowed"] == [DEFAULT.name]


def test_the_default_model_refuses_steps_it_was_not_distilled_for(deployment: Deployment) -> None:
    response = httpx.post(
        f"{deployment.server.url}/v1/generations",
        json={"prompt": PROMPT, "steps": 25},
        timeout=30,
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "steps" and error["allowed"] == [format_steps(DEFAULT.steps)]
    assert error["message"].startswith("steps=25 is not allowed")
