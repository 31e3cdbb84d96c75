"""API keys over real HTTP: a gateway with auth on, for the session stack's worker (issue 11).

Three keys: two clients (alice, bob) and an operator with the admin scope. Only their SHA-256
hashes are configured, as a deployment configures them.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_fixtures import MODEL, Server, Stack, serving_env, start_server

PROMPT = "a small green triangle on a black background"
KEYS = {
    "alice": "sk-alice-5f0c1d",
    "bob": "sk-bob-9a7e44",
    "carol": "sk-carol-77d0e2",
    "ops": "sk-ops-31b2c8",
}
# Routes anyone may call: the probes (kubelet), metrics (Prometheus) and the API's description.
OPEN = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys = [
        {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "admin": name == "ops"}
        for name, key in KEYS.items()
    ]
    env = serving_env(redis_url=stack.redis_url, auth="true", api_keys=json.dumps(keys))
    server = start_server(env, tmp_path_factory.mktemp("auth") / "gateway.log")
    yield server
    server.process.stop()


def test_every_route_but_probes_and_metrics_refuses_a_missing_or_wrong_key(
    gateway: Server,
) -> None:
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    routes = [
        (method, path)
        for path, methods in spec["paths"].items()
        for method in methods
        if path not in OPEN
    ]
    assert len(routes) >= 7, routes
    wrong = (
        {},
        {"Authorization": "Bearer sk-not-a-key"},
        {"Authorization": f"Basic {KEYS['alice']}"},
        {"Authorization": "Bearer"},
    )
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for method, path in routes:
            url = re.sub(r"\{[^}]+\}", "0", path)
            for headers in wrong:
                response = client.request(method, url, json={}, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["type"] == "unauthorized"
                assert response.headers["WWW-Authenticate"] == "Bearer"
            # the listed answer is the error model
            listed = spec["paths"][path][method]["responses"]["401"]
            assert listed["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/models", headers=_bearer("bob")).status_code == 200


def test_one_key_cannot_read_or_cancel_another_keys_job(gateway: Server) -> None:
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        made = client.post(
            "/v1/generations", json=body, headers={**_bearer("alice"), "Prefer": "wait=60"}
        )
        assert made.status_code == 200, made.text
        job_id = made.json()["id"]
        for method, path in (
            ("GET", f"/v1/generations/{job_id}"),
            ("GET", f"/v1/generations/{job_id}/images/0"),
            ("POST", f"/v1/generations/{job_id}/cancel"),
        ):
            # as unknown as a missing job: ids cannot be probed
            response = client.request(method, path, headers=_bearer("bob"))
            assert response.status_code == 404, (method, path, response.text)
        assert client.get(f"/v1/generations/{job_id}", headers=_bearer("alice")).status_code == 200
        image = client.get(f"/v1/generations/{job_id}/images/0", headers=_bearer("alice"))
        assert image.status_code == 200
        # the admin scope reads any job (operators look into and cancel runaway jobs)
        assert client.get(f"/v1/generations/{job_id}", headers=_bearer("ops")).status_code == 200


def test_idempotency_keys_are_scoped_per_api_key(gateway: Server) -> None:
    """Defect 5: one client's Idempotency-Key answered another client's request."""
    key = {"Idempotency-Key": f"shared-{time.time_ns()}"}
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        alice = client.post("/v1/generations", json=body, headers={**_bearer("alice"), **key})
        bob = client.post(
            "/v1/generations", json={**body, "steps": 2}, headers={**_bearer("bob"), **key}
        )
        again = client.post("/v1/generations", json=body, headers={**_bearer("alice"), **key})
    assert alice.status_code == bob.status_code == 202, bob.text
    assert alice.json()["id"] != bob.json()["id"]
    assert again.json()["id"] == alice.json()["id"]


def test_operational_routes_need_the_admin_scope(gateway: Server) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        refused = client.get("/v1/workers", headers=_bearer("alice"))
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
        workers = client.get("/v1/workers", headers=_bearer("ops")).json()["data"]
        assert [worker["model"] for worker in workers] == [MODEL]


def test_keys_are_never_logged(gateway: Server) -> None:
    httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": "Bearer sk-not-a-key"})
    httpx.get(f"{gateway.url}/v1/models", headers=_bearer("alice"))
    log = gateway.process.output()
    assert "GET /v1/models" in log  # the access log is on, and shows no key
    for key in (*KEYS.values(), "sk-not-a-key"):
        assert key not in log


def test_auth_on_without_keys_refuses_to_start(stack: Stack, tmp_path: Path) -> None:
    """Auth is off only when configured so: no keys is a configuration error, not an open door."""
    env = serving_env(redis_url=stack.redis_url, auth="true")
    with pytest.raises(RuntimeError, match="HYPERSD_API_KEYS names no key"):
        start_server(env, tmp_path / "gateway.log", timeout_s=30)


def test_a_key_lists_its_own_jobs_newest_first_in_pages(gateway: Server) -> None:
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1}
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        made = []
        for _ in range(3):  # canceled at once: listing, not generating, is the subject
            job_id = client.post("/v1/generations", json=body, headers=_bearer("carol")).json()[
                "id"
            ]
            client.post(f"/v1/generations/{job_id}/cancel", headers=_bearer("carol"))
            made.append(job_id)
        first = client.get("/v1/generations", params={"limit": 2}, headers=_bearer("carol")).json()
        assert [job["id"] for job in first["data"]] == made[:0:-1] and first["has_more"]
        assert first["last_id"] == made[1]
        rest = client.get(
            "/v1/generations",
            params={"limit": 2, "after": first["last_id"]},
            headers=_bearer("carol"),
        ).json()
        assert [job["id"] for job in rest["data"]] == made[:1] and not rest["has_more"]
        others = client.get("/v1/generations", params={"limit": 100}, headers=_bearer("bob")).json()
        assert not {job["id"] for job in others["data"]} & set(made)
        # another key's job is no cursor: as unknown as a missing one
        refused = client.get("/v1/generations", params={"after": made[0]}, headers=_bearer("bob"))
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "after"
