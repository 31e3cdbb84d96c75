"""Embedded mode's SIGTERM: the running jobs finish, the queued rest fail at once (issue 11, 9).

The queue of an embedded server lives in its process, so nobody would run the queued jobs after
it exits; running them all first took 172 queued jobs 61 s, past Kubernetes' 30 s grace.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from serving_fixtures import serving_env, start_server

PROMPT = "a large blue circle on a white background"


def test_sigterm_fails_the_queued_jobs_instead_of_running_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("embedded-shutdown")
    env = serving_env(slots=2, max_batch_size=8, shutdown_grace_s=5)
    server = start_server(env, folder / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            body = {"prompt": PROMPT, "n": 8}
            for _ in range(60):  # 480 images: about a minute of work on a shared CPU
                assert client.post("/v1/generations", json=body).status_code == 202
        started = time.monotonic()
        server.process.popen.send_signal(signal.SIGTERM)
        server.process.popen.wait(30)
        elapsed = time.monotonic() - started
    finally:
        server.process.stop()
    output = server.process.output()
    assert server.process.popen.returncode in (0, -signal.SIGTERM), output
    # the two jobs in a slot finish (or fail past the grace); the rest fail without running
    assert elapsed < 10, f"{elapsed:.1f} s\n{output}"
    assert "queued jobs failed (not started)" in output, output
    assert "Application shutdown complete" in output
