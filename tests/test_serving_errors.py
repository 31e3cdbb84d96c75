"""An unhandled error is a 500 in the error model, with the request's id for the client to quote.

Starlette answers unhandled errors outside the app's middleware, so this is the one answer the
`X-Request-Id` middleware cannot label; the error handler does. A job store that fails on every
read stands in for the bug (a real one cannot be made to fail on demand).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hypersd.registry import Registry
from jobs.memory_store import MemoryJobStore
from jobs.record import JobRecord
from jobs.settings import Settings
from service.app import create_app
from service.deps import Services


class BrokenStore(MemoryJobStore):
    def get(self, job_id: str) -> JobRecord | None:
        raise RuntimeError("a bug in the job store")


class NoQueue:
    def submit(self, record: JobRecord) -> None:
        raise AssertionError("nothing is submitted here")

    def depth(self, model: str) -> int:
        return 0


@asynccontextmanager
async def broken_services(settings: Settings, registry: Registry) -> AsyncIterator[Services]:
    with tempfile.TemporaryDirectory() as folder:
        store = BrokenStore(Path(folder), settings.job_ttl_s)
        yield Services(settings, registry, store, NoQueue(), served=registry.names, auth=False)


def test_a_500_carries_the_request_id_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(auth=False), services=broken_services)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        answer = client.get("/v1/generations/abc", headers={"X-Request-Id": "trace-7"})
    assert answer.status_code == 500
    assert answer.json()["error"]["type"] == "internal_error"
    assert "a bug" not in answer.text  # the error's text stays in the log
    assert answer.headers["X-Request-Id"] == "trace-7"
    assert any("trace-7" in record.getMessage() for record in caplog.records)
