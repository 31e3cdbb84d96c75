"""Embedded mode end to end over real HTTP: `hypersd serve` without REDIS_URL runs the model too.

The server is started as `make run` starts it, with no model named: it serves the registry's
default model (the distilled one), and requests here name no model and no steps unless a test is
about them.
"""

from __future__ import annotations

import io
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from serving_fixtures import MODEL, SHIPPED_REGISTRY, Server, serving_env, start_server

from hypersd.recipes import format_steps
from hypersd.registry import load_registry

PROMPT = "a large green cross above a small purple circle on a gray background"
DEFAULT = load_registry(SHIPPED_REGISTRY).get()  # the registry's default model


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("embedded")
    env = serving_env(slots=4, max_wait_ms=50, images_dir=folder / "images")
    del env["HYPERSD_AUTH"]  # as `make run` starts it: auth by default (off on loopback)
    server = start_server(env, folder / "server.log")
    yield server
    server.process.stop()


def test_embedded_server_generates_and_serves_images(embedded: Server) -> None:
    with httpx.Client(base_url=embedded.url, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        models = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
        assert models[DEFAULT.name]["served"] is True
        submitted = client.post("/v1/generations", json={"prompt": PROMPT})
        assert submitted.status_code == 202
        job_id = submitted.json()["id"]
        deadline = time.monotonic() + 60
        while (job := client.get(f"/v1/generations/{job_id}").json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "succeeded", job
        assert job["model"] == DEFAULT.name
        image = client.get(job["images"][0]["url"])
        assert image.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(image.content)) as png:
            assert png.format == "PNG" and png.size == (64, 64)


def test_embedded_server_batches_concurrent_requests(embedded: Server) -> None:
    def generate(seed: int) -> int:
        body = {"prompt": PROMPT, "seed": seed}
        response = httpx.post(
            f"{embedded.url}/v1/generations", json=body, headers={"Prefer": "wait=60"}, timeout=90
        )
        return response.status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(generate, range(6))) == [200] * 6
    # In embedded mode the worker's series are on the server's own /metrics.
    text = httpx.get(f"{embedded.url}/metrics").text
    ones = float(
        re.findall(r'hypersd_worker_batch_size_bucket\{le="1.0",model="[^"]+"\} (\S+)', text)[0]
    )
    count = float(re.findall(r'hypersd_worker_batch_size_count\{model="[^"]+"\} (\S+)', text)[0])
    assert count > ones, "no pipeline call ran more than one image"
    assert f'hypersd_jobs_finished_total{{model="{DEFAULT.name}",status="succeeded"}}' in text


def test_the_openai_client_works_against_the_embedded_server(embedded: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{embedded.url}/v1", api_key="unused")
    result = client.images.generate(prompt=PROMPT, n=1)
    assert result.data is not None and result.data[0].url is not None
    # relative (no HYPERSD_PUBLIC_URL here): never built from the request's Host header
    assert result.data[0].url.startswith("/v1/generations/")
    image = httpx.get(embedded.url + result.data[0].url)
    with Image.open(io.BytesIO(image.content)) as png:
        assert png.size == (64, 64)


def test_a_request_naming_no_model_gets_the_distilled_default_at_its_default_steps(
    embedded: Server,
) -> None:
    """`make run` + a request with neither model nor steps: the registry's default model (the
    distilled one, LoRAs fused, no CFG) at its default steps; the same image as asking for them."""
    assert DEFAULT.name != MODEL and DEFAULT.loras and DEFAULT.guidance_scale == 0
    with httpx.Client(base_url=embedded.url, timeout=90) as client:
        models = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
        assert [name for name, model in models.items() if model["served"]] == [DEFAULT.name]
        assert models[DEFAULT.name]["default_steps"] == DEFAULT.default_steps

        wait = {"Prefer": "wait=60"}
        body = {"prompt": PROMPT, "seed": 3, "response_format": "b64_json"}
        implicit = client.post("/v1/generations", json=body, headers=wait)
        explicit = client.post(
            "/v1/generations",
            json={**body, "model": DEFAULT.name, "steps": DEFAULT.default_steps},
            headers=wait,
        )
        for response in (implicit, explicit):
            assert response.status_code == 200, response.text
            job = response.json()
            assert job["status"] == "succeeded" and job["model"] == DEFAULT.name, job
        # An image depends only on prompt, seed and settings: equal bytes, equal settings.
        assert implicit.json()["images"][0]["b64_json"] == explicit.json()["images"][0]["b64_json"]

        # The teacher's 25 steps are not the distilled model's: 422 naming steps and the allowed.
        refused = client.post("/v1/generations", json={"prompt": PROMPT, "steps": 25})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["field"] == "steps" and error["allowed"] == [format_steps(DEFAULT.steps)]


def test_embedded_server_refuses_models_it_does_not_hold(embedded: Server) -> None:
    """Another registry model (the teacher, here) would wait for a worker that never comes: 422
    naming the field; `HYPERSD_MODEL=shapes-base` serves it instead."""
    body = {"prompt": PROMPT, "model": MODEL, "steps": 25}
    response = httpx.post(f"{embedded.url}/v1/generations", json=body, timeout=30)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "model" and error["allowed"] == [DEFAULT.name]
    openai_body = {"prompt": PROMPT, "model": MODEL}
    response = httpx.post(f"{embedded.url}/v1/images/generations", json=openai_body, timeout=30)
    # OpenAI's route answers OpenAI's 400 naming the field in `param`
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


def test_sigterm_stops_the_embedded_server_cleanly(embedded: Server) -> None:
    embedded.process.stop()
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert embedded.process.popen.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in embedded.process.output()


def test_embedded_mode_on_loopback_says_at_start_that_auth_is_off(embedded: Server) -> None:
    """No keys needed on 127.0.0.1 (one user's own server), and the log says so."""
    assert "auth is off: embedded mode on 127.0.0.1 (loopback)" in embedded.process.output()
