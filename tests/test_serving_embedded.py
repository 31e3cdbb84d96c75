"""Embedded mode end to end over real HTTP: `hypersd serve` without REDIS_URL runs the model too."""

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
from serving_fixtures import Server, serving_env, start_server

PROMPT = "a large green cross above a small purple circle on a gray background"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("embedded")
    env = serving_env(slots=4, max_wait_ms=50, images_dir=folder / "images")
    server = start_server(env, folder / "server.log")
    yield server
    server.process.stop()


def test_embedded_server_generates_and_serves_images(embedded: Server) -> None:
    with httpx.Client(base_url=embedded.url, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["served"] is True
        submitted = client.post("/v1/generations", json={"prompt": PROMPT, "steps": 2})
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
        image = client.get(job["images"][0]["url"])
        assert image.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(image.content)) as png:
            assert png.format == "PNG" and png.size == (64, 64)


def test_embedded_server_batches_concurrent_requests(embedded: Server) -> None:
    def generate(seed: int) -> int:
        body = {"prompt": PROMPT, "steps": 4, "seed": seed}
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
    assert 'hypersd_jobs_finished_total{model="shapes-base",status="succeeded"}' in text


def test_the_openai_client_works_against_the_embedded_server(embedded: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{embedded.url}/v1", api_key="unused")
    result = client.images.generate(prompt=PROMPT, n=1)
    assert result.data is not None and result.data[0].url is not None
    image = httpx.get(result.data[0].url)
    with Image.open(io.BytesIO(image.content)) as png:
        assert png.size == (64, 64)


def test_embedded_server_refuses_models_it_does_not_hold(embedded: Server) -> None:
    """Another registry model would wait for a worker that never comes: 422 naming the field."""
    body = {"prompt": PROMPT, "model": "shapes-hyper-4step"}
    response = httpx.post(f"{embedded.url}/v1/generations", json=body, timeout=30)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "model" and error["allowed"] == ["shapes-base"]
    openai_body = {"prompt": PROMPT, "model": "shapes-hyper-4step"}
    response = httpx.post(f"{embedded.url}/v1/images/generations", json=openai_body, timeout=30)
    assert response.status_code == 422 and response.json()["error"]["field"] == "model"


def test_sigterm_stops_the_embedded_server_cleanly(embedded: Server) -> None:
    embedded.process.stop()
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert embedded.process.popen.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in embedded.process.output()
