"""The gateway installs and runs without torch: `pip install ".[gateway]"` in a fresh venv.

The venv gets this checkout's packages (copied, so the build leaves nothing in the tree) with the
gateway's extra only. Its `hypersd serve` then runs on the session's Redis and must answer
`/healthz` and `/v1/models` and queue a generation, with torch, diffusers and transformers not
importable in that venv.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from serving_fixtures import MODEL, REPO, Server, serving_env, start_server

from jobs.queue import queue_name

pytestmark = pytest.mark.slow

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")
SOURCES = ("pyproject.toml", "README.md", "hypersd", "jobs", "service", "worker", "launcher")
DATABASE = 6  # a Redis database of its own: no worker of another test takes its jobs


@pytest.fixture(scope="module")
def gateway_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding `hypersd[gateway]` and nothing else; returns its bin folder."""
    root = tmp_path_factory.mktemp("gateway-install")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    bin_dir = root / "venv" / "bin"
    install = subprocess.run(
        [
            str(bin_dir / "python"),
            *("-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
            f"{source}[gateway]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return bin_dir


def test_the_gateway_install_has_no_model_libraries(gateway_venv: Path) -> None:
    listed = subprocess.run(
        [str(gateway_venv / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"fastapi", "celery", "redis", "hypersd"} <= installed
    assert not installed & set(MODEL_LIBRARIES)
    assert not [name for name in installed if name.startswith("nvidia-")]
    code = (
        "import importlib.util as u; "
        f"print([m for m in {MODEL_LIBRARIES!r} if u.find_spec(m) is not None])"
    )
    found = subprocess.run(
        [str(gateway_venv / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def slim_gateway(
    gateway_venv: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`hypersd serve` of the gateway-only venv, on its own Redis database."""
    url = f"{redis_url}/{DATABASE}"
    log = tmp_path_factory.mktemp("slim-gateway") / "gateway.log"
    server = start_server(serving_env(redis_url=url), log, hypersd=[str(gateway_venv / "hypersd")])
    try:
        yield server
    finally:
        server.process.stop()
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()


def test_the_gateway_without_torch_answers_and_enqueues(
    slim_gateway: Server, redis_url: str
) -> None:
    url = slim_gateway.url
    assert httpx.get(f"{url}/healthz").status_code == 200
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert MODEL in {model["id"] for model in models}

    prompt = "a large red circle in the center on a white background"
    answer = httpx.post(f"{url}/v1/generations", json={"prompt": prompt, "model": MODEL})
    assert answer.status_code == 202, answer.text
    job = httpx.get(f"{url}/v1/generations/{answer.json()['id']}").json()
    assert job["status"] == "queued" and job["model"] == MODEL
    # The job's message waits on the model's Celery queue for a worker (there is none here).
    client = redis.Redis.from_url(f"{redis_url}/{DATABASE}")
    try:
        assert client.llen(queue_name(MODEL)) == 1
    finally:
        client.close()
    # Steps the model's registry entry refuses are checked at the gateway, without the model.
    body = {"prompt": prompt, "model": MODEL, "steps": 51}
    refused = httpx.post(f"{url}/v1/generations", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "steps"
    log = slim_gateway.process.output()
    assert "Traceback" not in log, log
