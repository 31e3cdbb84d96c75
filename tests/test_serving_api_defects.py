"""The defects found by testing the API from outside (issue 11), each over real HTTP.

Most run against the session's stack (gateway + a worker for MODEL on Redis); those about a
setting run against a second gateway (`configured`) on the same Redis database and worker, with a
public URL, a small body limit, a short synchronous timeout and a configured default model.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serving_fixtures import (
    MODEL,
    SHIPPED_REGISTRY,
    Server,
    Stack,
    serving_env,
    start_server,
)

from hypersd.contracts import MAX_SEED
from hypersd.registry import load_registry

PROMPT = "a small red square on a white background"
PUBLIC_URL = "https://images.example.com/api"
BODY_LIMIT = 4096
DEFAULT = load_registry(SHIPPED_REGISTRY).default


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def configured(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second gateway for the stack's worker: public URL, 4 KB bodies, 0.2 s sync timeout, and
    two served models with MODEL configured as the default."""
    env = serving_env(
        redis_url=stack.redis_url,
        public_url=PUBLIC_URL,
        max_body_bytes=BODY_LIMIT,
        sync_timeout_s=0.2,
        served_models=json.dumps([DEFAULT, MODEL]),
        default_model=MODEL,
    )
    server = start_server(env, tmp_path_factory.mktemp("configured") / "gateway.log")
    yield server
    server.process.stop()


def _wait(client: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = client.post("/v1/generations", json=body, headers={"Prefer": "wait=60", **headers})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    assert job["status"] == "succeeded", job
    return job


def test_the_spec_lists_every_status_code_each_route_sends(client: httpx.Client) -> None:
    """Defect 1: 200 (`Prefer: wait`, a replay), 400 and 503 were sent but not in the spec."""
    paths = client.get("/openapi.json").json()["paths"]
    sent = {
        ("/v1/generations", "post"): {
            "200",
            "202",
            "400",
            "409",
            "413",
            "415",
            "422",
            "429",
            "503",
        },
        ("/v1/images/generations", "post"): {
            "200",
            "400",
            "409",
            "413",
            "415",
            "429",
            "503",
            "504",
        },
        ("/v1/generations/{job_id}", "get"): {"200", "404", "503"},
        ("/v1/generations/{job_id}/images/{index}", "get"): {"200", "304", "404", "422", "503"},
        ("/v1/models/{model_id}", "get"): {"200", "404"},
    }
    for (path, method), codes in sent.items():
        listed = set(paths[path][method]["responses"])
        assert codes <= listed, (path, method, codes - listed)
        for code in listed - {"200", "202", "304"}:  # a 304 has no body
            schema = paths[path][method]["responses"][code]["content"]["application/json"]
            assert schema["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (path, code)


def test_the_openai_route_is_idempotent_and_its_504_names_the_job(configured: Server) -> None:
    """Defect 3: the client's retries after a 504 made new jobs; the job id was only in text."""
    body = {"prompt": PROMPT, "model": MODEL, "n": 8, "response_format": "b64_json"}
    key = {"Idempotency-Key": f"openai-{time.time_ns()}"}
    with httpx.Client(base_url=configured.url, timeout=30) as client:
        first = client.post("/v1/images/generations", json=body, headers=key)
        assert first.status_code == 504, first.text
        job_id = first.json()["error"]["job_id"]
        again = client.post("/v1/images/generations", json=body, headers=key)
        if again.status_code == 504:  # still running: the same job, not a new one
            assert again.json()["error"]["job_id"] == job_id
        job = client.get(f"/v1/generations/{job_id}").json()
        assert job["model"] == MODEL and len(job["seeds"]) == 8


def test_openai_errors_streaming_and_model_retrieval(stack: Stack) -> None:
    """Defect 4: OpenAI's 400 with `param` and `code`; `stream=True` refused, not an empty
    stream; `models.retrieve` answers."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{stack.server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt=PROMPT, model="no-such-model")
    assert refused.value.param == "model" and refused.value.code == "invalid_value"
    response = httpx.post(
        f"{stack.server.url}/v1/images/generations",
        json={"prompt": PROMPT, "model": MODEL, "stream": True},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_an_empty_idempotency_key_is_refused(client: httpx.Client) -> None:
    """Defect 5: an empty key was used as a key (every keyless-by-mistake client shared it)."""
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    response = client.post("/v1/generations", json=body, headers={"Idempotency-Key": ""})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "idempotency-key"


def test_seeds_stay_within_what_json_and_javascript_hold(client: httpx.Client) -> None:
    """Defect 6: seeds (given, derived and random) stay within 0..2^53 - 1, so any seed a job
    reports can be sent back."""
    assert MAX_SEED == 2**53 - 1
    top = {"prompt": PROMPT, "model": MODEL, "steps": 1, "seed": MAX_SEED - 1, "n": 2}
    response = client.post("/v1/generations", json=top)
    assert response.status_code == 202 and response.json()["seeds"] == [MAX_SEED - 1, MAX_SEED]
    for seed, n in ((MAX_SEED, 2), (MAX_SEED + 1, 1), (2**63 - 1, 1)):
        refused = client.post("/v1/generations", json={**top, "seed": seed, "n": n})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "seed"
    random = client.post("/v1/generations", json={**top, "seed": None, "n": 8}).json()
    assert all(0 <= seed <= MAX_SEED for seed in random["seeds"]), random["seeds"]


def test_a_body_over_the_limit_is_413_before_it_is_parsed(configured: Server) -> None:
    """Defect 7: a large body was read and parsed whole before its 422. Declared too large: 413
    from the header; sent without a length (chunked): 413 once past the limit."""
    body = json.dumps({"prompt": "x" * BODY_LIMIT, "model": MODEL}).encode()
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=configured.url, timeout=30) as client:
        declared = client.post("/v1/generations", content=body, headers=headers)
        chunked = client.post(
            "/v1/generations", content=iter([body[:100], body[100:]]), headers=headers
        )
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["type"] == "payload_too_large"


def test_image_urls_never_come_from_the_host_header(stack: Stack, configured: Server) -> None:
    """Defect 8: `Host: evil.example` made image URLs point at evil.example. Without a public
    URL they are relative; with one, they start with it."""
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    evil = {"Host": "evil.example"}
    with httpx.Client(base_url=stack.server.url, timeout=60) as client:
        job = _wait(client, body, **evil)
        assert job["images"][0]["url"] == f"/v1/generations/{job['id']}/images/0"
        assert job["links"]["self"] == f"/v1/generations/{job['id']}"
    with httpx.Client(base_url=configured.url, timeout=60) as client:
        job = _wait(client, body, **evil)
        assert job["images"][0]["url"] == f"{PUBLIC_URL}/v1/generations/{job['id']}/images/0"


def test_content_type_index_strict_ints_and_long_ids(client: httpx.Client) -> None:
    """Defect 10: JSON sent as text/plain is a 415 (was 422); `/images/1.0` names no image (was
    image 1); `"n": true` is refused (was 1); a 404 does not echo a 10 KB id."""
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    plain = client.post(
        "/v1/generations", content=json.dumps(body), headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 415 and plain.json()["error"]["type"] == "unsupported_media_type"
    for field, value in (("n", True), ("steps", 1.0), ("seed", "5")):
        refused = client.post("/v1/generations", json={**body, field: value})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field
    job = _wait(client, {**body, "n": 2})
    assert client.get(f"/v1/generations/{job['id']}/images/1").status_code == 200
    for index in ("1.0", "+1", "01x"):
        response = client.get(f"/v1/generations/{job['id']}/images/{index}")
        assert response.status_code == 422, index
    long_id = "a" * 10_000
    response = client.get(f"/v1/generations/{long_id}")
    assert response.status_code == 404 and len(response.content) < 500


def test_a_size_the_model_does_not_make_is_refused_with_its_sizes(client: httpx.Client) -> None:
    """Defect 10: the spec allows 8..4096 for every model; a size the model was not made for is
    refused with the sizes it makes."""
    response = client.post("/v1/generations", json={"prompt": PROMPT, "model": MODEL, "width": 96})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "width" and error["allowed"] == ["64x64"]


def test_a_configured_default_model_answers_a_request_naming_none(configured: Server) -> None:
    """Defect 11: a deployment serving several models gives a request naming none its
    configured default (`HYPERSD_DEFAULT_MODEL`), not the registry's."""
    response = httpx.post(f"{configured.url}/v1/generations", json={"prompt": PROMPT, "steps": 1})
    assert response.status_code == 202 and response.json()["model"] == MODEL


def test_a_black_holed_redis_does_not_block_other_requests(tmp_path: Any) -> None:
    """The async routes called Redis on the event loop: one request stuck on a Redis that
    accepts and never answers held every other request, even `/healthz`."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hole.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
    server = start_server(serving_env(redis_url=url), tmp_path / "gateway.log")
    try:
        body = {"prompt": PROMPT, "model": MODEL, "steps": 1}

        def post() -> None:
            # answered 503 after the Redis socket timeout, or cut off when the server is killed
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{server.url}/v1/generations", json=body, timeout=30)

        stuck = threading.Thread(target=post, daemon=True)
        stuck.start()
        time.sleep(0.5)  # the POST is now waiting on the black hole
        assert stuck.is_alive()
        started = time.monotonic()
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - started < 1
    finally:
        server.process.kill()
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        hole.close()


def test_every_answer_carries_a_request_id(client: httpx.Client, configured: Server) -> None:
    """`X-Request-Id`: the client's own when it is a sane token, else a fresh one."""
    fresh = {client.get("/healthz").headers["X-Request-Id"] for _ in range(2)}
    assert len(fresh) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", value) for value in fresh)
    mine = client.get("/v1/generations/nope", headers={"X-Request-Id": "trace-42.a"})
    assert mine.status_code == 404 and mine.headers["X-Request-Id"] == "trace-42.a"
    odd = client.get("/healthz", headers={"X-Request-Id": "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["X-Request-Id"])
    too_large = httpx.post(f"{configured.url}/v1/generations", json={"prompt": "x" * BODY_LIMIT})
    assert too_large.status_code == 413 and "X-Request-Id" in too_large.headers
