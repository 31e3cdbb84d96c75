"""The HTTP API over real processes: `hypersd serve` -> Redis -> a `hypersd worker` (Celery).

The worker serves the teacher (`MODEL`, shapes-base), which every request here names: these tests
are about serving mechanics, not the registry's default model (see `test_serving_default_model.py`).
Jobs use 1-8 steps to stay quick on a shared CPU; nothing depends on exact pixels (the shipped
model is re-exported by training now and then).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from typing import Any

import httpx
import pytest
from PIL import Image
from serving_fixtures import MODEL, SHIPPED_REGISTRY, Stack

from hypersd.registry import load_registry

PROMPT = "a large red circle in the center on a white background"


def poll(client: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = client.get(f"/v1/generations/{job_id}").json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


@pytest.fixture
def client(stack: Stack) -> Any:
    with httpx.Client(base_url=stack.server.url, timeout=60) as client:
        yield client


def test_submit_poll_and_fetch_a_png_of_the_asked_size(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generations", json={"prompt": PROMPT, "model": MODEL, "steps": 2, "seed": 5}
    )
    assert response.status_code == 202
    submitted = response.json()
    assert submitted["status"] == "queued" and submitted["links"]["self"].endswith(submitted["id"])
    job = poll(client, submitted["id"])
    assert job["status"] == "succeeded", job
    assert job["seeds"] == [5] and job["queue_seconds"] >= 0 and job["run_seconds"] > 0
    image = client.get(job["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(image.content)) as png:
        assert png.format == "PNG" and png.size == (64, 64)
    assert client.get(f"/v1/generations/{submitted['id']}/images/1").status_code == 404


def test_prefer_wait_answers_with_the_finished_job(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generations",
        json={
            "prompt": PROMPT,
            "model": MODEL,
            "steps": 1,
            "n": 2,
            "response_format": "b64_json",
            "output_format": "webp",
        },
        headers={"Prefer": "wait=30"},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and len(job["images"]) == 2
    for image in job["images"]:
        assert image["content_type"] == "image/webp"
        with Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))) as webp:
            assert webp.format == "WEBP" and webp.size == (64, 64)


def test_the_openai_client_generates_images(stack: Stack) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{stack.server.url}/v1", api_key="unused")
    result = client.images.generate(
        prompt=PROMPT, model=MODEL, n=2, size="64x64", response_format="b64_json"
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as png:
            assert png.size == (64, 64)
    # OpenAI's shape: a refused value is a 400 naming it in `param`, with a `code`
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt=PROMPT, model=MODEL, size="512x512")
    assert refused.value.param == "size" and refused.value.code == "invalid_value"


def test_idempotency_key_same_body_same_job_other_body_409(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    headers = {"Idempotency-Key": f"key-{time.time_ns()}"}
    first = client.post("/v1/generations", json=body, headers=headers)
    again = client.post("/v1/generations", json=body, headers=headers)
    assert first.status_code in (200, 202) and again.status_code in (200, 202)
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/generations", json={**body, "steps": 2}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["type"] == "idempotency_conflict"


def test_concurrent_jobs_are_batched_and_a_canceled_queued_job_never_runs(
    client: httpx.Client, stack: Stack
) -> None:
    # 4 slots: the first 4 jobs are taken at once and batched; the 5th waits in the queue.
    body = {"prompt": PROMPT, "model": MODEL, "steps": 8}
    ids = [client.post("/v1/generations", json=body).json()["id"] for _ in range(5)]
    canceled = client.post(f"/v1/generations/{ids[-1]}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    jobs = [poll(client, job_id) for job_id in ids[:-1]]
    assert [job["status"] for job in jobs] == ["succeeded"] * 4
    time.sleep(0.5)  # the worker takes the canceled job's message and skips it
    last = client.get(f"/v1/generations/{ids[-1]}").json()
    assert last["status"] == "canceled" and last["started_at"] is None and last["images"] == []
    assert client.post(f"/v1/generations/{ids[-1]}/cancel").status_code == 409

    text = httpx.get(stack.worker_metrics_url).text
    buckets = {
        float(le): float(count)
        for le, count in re.findall(
            r'hypersd_worker_batch_size_bucket\{le="([^"]+)",model="shapes-base"\} (\S+)', text
        )
        if le != "+Inf"
    }
    count = float(
        re.findall(r'hypersd_worker_batch_size_count\{model="shapes-base"\} (\S+)', text)[0]
    )
    assert count > buckets[1.0], "no pipeline call ran more than one image"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"negative_prompt": "x" * 1001}, "negative_prompt"),
        ({"model": "nope"}, "model"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"width": 128}, "width"),
        ({"height": 32}, "height"),
        ({"n": 9}, "n"),
        ({"seed": -1}, "seed"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"eta": 0.5}, "eta"),
        ({"output_format": "gif"}, "output_format"),
        ({"response_format": "file"}, "response_format"),
        ({"size": "64x64"}, "size"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/generations", json={"prompt": PROMPT, "model": MODEL, **body})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == field and error["type"] == "invalid_request"
    assert error["message"]


def test_the_distilled_models_steps_are_checked_at_the_gateway(client: httpx.Client) -> None:
    """The 4-step model asked for the teacher's 25 steps: 422 naming steps and what is allowed."""
    body = {"prompt": PROMPT, "model": "shapes-hyper-4step", "steps": 25}
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "steps" and error["allowed"] == ["4"]
    assert "shapes-hyper-4step" in error["message"] and "allowed: 4" in error["message"]


def test_a_request_naming_no_model_gets_the_one_model_served(client: httpx.Client) -> None:
    """This deployment serves only MODEL (not the registry's default): a request naming no model
    gets it, not a 422 for a default that has no worker (issue 11, defect 11)."""
    assert load_registry(SHIPPED_REGISTRY).default != MODEL
    response = client.post("/v1/generations", json={"prompt": PROMPT, "steps": 1})
    assert response.status_code == 202, response.text
    assert response.json()["model"] == MODEL
    assert poll(client, response.json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize("content", [b"{not json", b'{"prompt":', b"\xff"])
def test_malformed_json_is_400_naming_the_body(client: httpx.Client, content: bytes) -> None:
    """Syntax, not a refused value: 400 naming `body` (was 422 naming a byte offset, or a 400
    naming nothing for bytes that are not text)."""
    response = client.post(
        "/v1/generations", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["field"] == "body" and error["type"] == "invalid_json"


def test_unknown_job_is_404_in_the_error_model(client: httpx.Client) -> None:
    response = client.get("/v1/generations/does-not-exist")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_models_report_the_backend_their_workers_run(stack: Stack, client: httpx.Client) -> None:
    import redis

    from jobs.redis_store import RedisJobStore
    from jobs.store import WorkerInfo

    def models() -> dict[str, dict[str, Any]]:
        return {model["id"]: model for model in client.get("/v1/models").json()["data"]}

    # the worker's heartbeat: its backend as built; a model without workers: the registry's
    assert models()[MODEL]["backend"] == "onnxruntime"
    assert load_registry(SHIPPED_REGISTRY).get("shapes-hyper-1step").backend == "onnxruntime"
    assert models()["shapes-hyper-1step"]["backend"] == "onnxruntime"
    # A second worker of the model whose backend fell back to eager: both are shown.
    redis_client = redis.Redis.from_url(stack.redis_url)
    store = RedisJobStore(redis_client, ttl_s=60)
    fell_back = WorkerInfo(
        id="fell-back", model=MODEL, backend="eager", capacity=1, busy=0, last_beat=time.time()
    )
    store.beat(fell_back, ttl=30)
    try:
        model = models()[MODEL]
        assert (model["backend"], model["workers"]) == ("eager, onnxruntime", 2)
    finally:
        store.forget_worker(fell_back.id)
        redis_client.close()
    assert models()[MODEL]["backend"] == "onnxruntime"


def test_models_probes_and_metrics(client: httpx.Client) -> None:
    models = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
    assert "shapes-base" in models and "shapes-hyper-1step" in models
    assert models["shapes-base"]["served"] and models["shapes-base"]["sizes"] == ["64x64"]
    # only shapes-base has a worker here; /readyz needs only Redis
    assert not models["shapes-hyper-1step"]["served"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    openapi = client.get("/openapi.json").json()
    create = openapi["paths"]["/v1/generations"]["post"]
    assert create["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    client.post(
        "/v1/generations",
        json={"prompt": PROMPT, "model": MODEL, "steps": 1},
        headers={"Prefer": "wait=30"},
    )
    text = client.get("/metrics").text
    for series in (
        'hypersd_http_requests_total{code="200",route="/v1/generations"}',
        'hypersd_http_request_duration_seconds_bucket{le="0.005",route="/v1/generations"}',
        'hypersd_jobs_submitted_total{model="shapes-base"}',
        'hypersd_jobs_finished_total{model="shapes-base",status="succeeded"}',
        'hypersd_queue_depth{model="shapes-base"}',
    ):
        assert series in text, series


def test_worker_metrics_and_heartbeat_file(stack: Stack) -> None:
    text = httpx.get(stack.worker_metrics_url).text
    for series in (
        "hypersd_worker_queue_wait_seconds_bucket",
        'phase="denoising"',
        'phase="image_encoding"',
        'hypersd_worker_model_load_seconds{model="shapes-base"}',
        'hypersd_worker_busy_slots{model="shapes-base"}',
    ):
        assert series in text, series
    beat = json.loads(stack.heartbeat_file.read_text())
    assert beat["model"] == "shapes-base" and beat["capacity"] == 4
    assert time.time() - beat["last_beat"] < 5
