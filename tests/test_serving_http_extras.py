"""What API users expect (issue 11): generation parameters in the PNG, `ETag`/`Cache-Control` on
images, CORS (off by default), JSON logs with the request id; on a real gateway, Redis, worker."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import PIL.Image
import pytest
from serving_fixtures import MODEL, Server, Stack, serving_env, start_server

from hypersd import __version__

PROMPT = "a small orange circle on a white background"
ORIGIN = "https://app.example.com"


def _image(server: Server, body: dict[str, object]) -> tuple[str, httpx.Response]:
    created = httpx.post(
        f"{server.url}/v1/generations", json=body, headers={"Prefer": "wait=60"}, timeout=70
    )
    assert created.status_code == 200, created.text
    url = created.json()["images"][0]["url"]
    return url, httpx.get(f"{server.url}{url}", timeout=10)


def test_a_png_carries_its_generation_parameters(stack: Stack) -> None:
    body = {
        "prompt": PROMPT,
        "negative_prompt": "blurry, ünïcödé",
        "model": MODEL,
        "steps": 2,
        "guidance_scale": 3,
        "seed": 1234,
        "n": 2,
    }
    url, answer = _image(stack.server, body)
    text = PIL.Image.open(io.BytesIO(answer.content)).text
    assert text["prompt"] == PROMPT and text["negative_prompt"] == "blurry, ünïcödé"
    assert text["model"] == MODEL and text["steps"] == "2" and text["guidance_scale"] == "3"
    assert text["seed"] == "1234" and text["hypersd_version"] == __version__
    width, height = PIL.Image.open(io.BytesIO(answer.content)).size
    assert text["size"] == f"{width}x{height}"
    second = httpx.get(f"{stack.server.url}{url[:-1]}1", timeout=10)
    assert PIL.Image.open(io.BytesIO(second.content)).text["seed"] == "1235"  # its own seed


def test_an_image_has_a_strong_etag_and_answers_304_to_it(stack: Stack) -> None:
    url, answer = _image(stack.server, {"prompt": PROMPT, "model": MODEL, "steps": 1})
    etag = answer.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert answer.headers["cache-control"].startswith("private, max-age=")
    assert int(answer.headers["cache-control"].rpartition("=")[2]) > 0

    again = httpx.get(f"{stack.server.url}{url}", headers={"If-None-Match": etag}, timeout=10)
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    listed = httpx.get(
        f"{stack.server.url}{url}", headers={"If-None-Match": f'"other", W/{etag}'}, timeout=10
    )
    assert listed.status_code == 304
    other = httpx.get(f"{stack.server.url}{url}", headers={"If-None-Match": '"x"'}, timeout=10)
    assert other.status_code == 200 and other.content == answer.content


@pytest.fixture(scope="module")
def configured(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway with CORS for ORIGIN and JSON logs, on the stack's Redis and worker."""
    env = serving_env(
        redis_url=stack.redis_url, cors_origins=json.dumps([ORIGIN]), log_format="json"
    )
    server = start_server(env, tmp_path_factory.mktemp("configured") / "gateway.log")
    yield server
    server.process.stop()


def _preflight(server: Server, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return httpx.options(f"{server.url}/v1/generations", headers=headers, timeout=10)


def test_cors_allows_only_the_configured_origins(configured: Server, stack: Stack) -> None:
    allowed = _preflight(configured, ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = _preflight(configured, "https://evil.example")
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(f"{configured.url}/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "X-Request-Id" in simple.headers["access-control-expose-headers"]
    # off by default: the stack's gateway names no origin
    default = httpx.get(f"{stack.server.url}/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert "access-control-allow-origin" not in default.headers


def test_json_logs_are_one_object_per_line_with_the_request_id(configured: Server) -> None:
    secret = "sk-never-in-a-log"
    answer = httpx.get(
        f"{configured.url}/v1/generations/unknown-job",
        headers={"X-Request-Id": "trace-42", "Authorization": f"Bearer {secret}"},
        timeout=10,
    )
    assert answer.status_code == 404
    configured.process.stop()  # flushes its output
    lines = [line for line in configured.process.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    traced = [r for r in records if r["request_id"] == "trace-42"]
    assert traced and "/v1/generations/unknown-job" in traced[0]["message"]
    assert traced[0]["logger"] == "uvicorn.access" and traced[0]["level"] == "INFO"
    assert secret not in configured.process.output()
