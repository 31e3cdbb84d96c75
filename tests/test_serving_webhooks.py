"""Webhooks (issue 11): a job's end POSTed, HMAC-signed, to a real local HTTP receiver, retried
after a failure; URLs the allow-list does not cover are refused with a 422 naming `webhook`.

The gateway under test runs beside the session stack's gateway, on the same Redis database, so
the stack's real worker runs its jobs; only this gateway has webhooks on, so it alone delivers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis
from serving_fixtures import MODEL, Server, Stack, serving_env, start_server, wait_until

from hypersd.contracts import GenerateRequest
from hypersd.registry import load_registry
from jobs import webhooks
from jobs.memory_store import MemoryJobStore
from jobs.record import resolve_request
from jobs.redis_store import WEBHOOKS, RedisJobStore
from jobs.settings import Settings
from jobs.states import cancel
from jobs.webhooks import WebhookSender, check_url, sign, verify

SECRET = "test-webhook-secret"
PROMPT = "a small orange circle on a white background"


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server on a free loopback port; answers each POST with the next status of
    `statuses` (200 once they run out) and records what it got."""

    statuses: list[int] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append(Call(dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.start()
    yield hook
    hook.stop()


@pytest.fixture(scope="module")
def hooks_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway with webhooks on (127.0.0.1 allowed) on the stack's Redis and worker."""
    env = serving_env(
        redis_url=stack.redis_url,
        webhook_hosts=json.dumps(["127.0.0.1"]),
        webhook_secret=SECRET,
        webhook_max_attempts=3,
    )
    server = start_server(env, tmp_path_factory.mktemp("hooks") / "gateway.log")
    yield server
    server.process.stop()


def _verified(call: Call) -> dict[str, object]:
    """The receiver's side: check the signature as docs/serving.md says, then parse."""
    timestamp = call.headers["X-Hypersd-Timestamp"]
    assert verify(SECRET, timestamp, call.body, call.headers["X-Hypersd-Signature"])
    body: dict[str, object] = json.loads(call.body)
    return body


def test_a_finished_job_is_posted_signed_and_retried_after_a_500(
    hooks_gateway: Server, receiver: Receiver
) -> None:
    receiver.statuses = [500]  # the first delivery fails, the retry (1 s later) succeeds
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1, "webhook": receiver.url}
    created = httpx.post(f"{hooks_gateway.url}/v1/generations", json=body, timeout=10)
    assert created.status_code == 202, created.text

    wait_until(lambda: len(receiver.calls) >= 2, 60, "two webhook deliveries")
    first, second = receiver.calls[:2]
    assert first.body == second.body  # the same job, signed afresh per try
    job = _verified(second)
    assert job["id"] == created.json()["id"] and job["status"] == "succeeded"
    assert second.headers["Content-Type"] == "application/json"
    time.sleep(1.5)  # delivered: no third try
    assert len(receiver.calls) == 2


def test_a_canceled_job_is_posted_too(
    stack: Stack, hooks_gateway: Server, receiver: Receiver
) -> None:
    """A job ended by a cancel (no worker involved) gets its webhook as well."""
    # 50 steps of the teacher: still running (or queued) when the cancel comes
    body = {"prompt": PROMPT, "model": MODEL, "steps": 50, "n": 4, "webhook": receiver.url}
    job_id = httpx.post(f"{hooks_gateway.url}/v1/generations", json=body, timeout=10).json()["id"]
    canceled = httpx.post(f"{hooks_gateway.url}/v1/generations/{job_id}/cancel", timeout=10)
    assert canceled.status_code == 200
    wait_until(lambda: len(receiver.calls) >= 1, 30, "the webhook of a canceled job")
    job = _verified(receiver.calls[0])
    assert job["id"] == job_id and job["status"] == "canceled"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/hook", "not on the allow-list"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://127.0.0.1/hook", "scheme 'gopher'"),
        ("http://user:pw@127.0.0.1/hook", "without user or password"),
    ],
)
def test_a_webhook_the_allow_list_does_not_cover_is_refused(
    hooks_gateway: Server, url: str, reason: str
) -> None:
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1, "webhook": url}
    answer = httpx.post(f"{hooks_gateway.url}/v1/generations", json=body, timeout=10)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == "webhook" and reason in error["message"]


def test_webhooks_are_refused_where_none_are_allowed(stack: Stack) -> None:
    """The default deployment (no HYPERSD_WEBHOOK_HOSTS) refuses any webhook."""
    body = {"prompt": PROMPT, "model": MODEL, "steps": 1, "webhook": "https://example.com/h"}
    answer = httpx.post(f"{stack.server.url}/v1/generations", json=body, timeout=10)
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "webhook"
    assert "not enabled" in answer.json()["error"]["message"]


def test_a_listed_name_resolving_to_an_internal_address_is_refused() -> None:
    """Listing a name is not enough when it resolves to loopback/private/link-local: the address
    itself must be listed (a DNS name pointed at 169.254.169.254 reaches no metadata service)."""
    for address in ("127.0.0.1", "10.0.0.7", "169.254.169.254", "::1", "192.168.1.2"):
        with pytest.raises(ValueError, match="non-public address"):
            check_url(
                "https://hooks.example.com/x", ["hooks.example.com"], lambda *_, a=address: [a]
            )
    check_url("https://hooks.example.com/x", ["hooks.example.com"], lambda *_: ["93.184.215.14"])
    check_url("http://localhost:9/x", ["localhost", "127.0.0.1"], lambda *_: ["127.0.0.1"])
    with pytest.raises(ValueError, match="does not resolve"):
        check_url("http://no-such-host.invalid/x", ["no-such-host.invalid"])


def test_a_signature_verifies_only_for_its_body_secret_and_time() -> None:
    body, now = b'{"id":"abc","status":"succeeded"}', str(int(time.time()))
    signature = sign(SECRET, now, body)
    assert signature.startswith("sha256=") and verify(SECRET, now, body, signature)
    assert not verify(SECRET, now, body + b" ", signature)
    assert not verify("another secret", now, body, signature)
    old = str(int(time.time()) - 3600)  # a replayed delivery
    assert not verify(SECRET, old, body, sign(SECRET, old, body))
    assert not verify(SECRET, "not a time", body, signature)


def test_a_webhook_outlives_a_killed_deliverer_and_gives_up_after_its_tries(
    redis_url: str, receiver: Receiver
) -> None:
    """The outbox entry is written with the job's end; a deliverer that took it and died leaves
    it due again after its lease; failures stop after `webhook_max_attempts` tries."""
    client = redis.Redis.from_url(f"{redis_url}/12")
    client.flushdb()
    store = RedisJobStore(client, ttl_s=60)
    settings = Settings(webhook_hosts=["127.0.0.1"], webhook_secret=SECRET, webhook_max_attempts=2)
    registry = load_registry(None)
    request = GenerateRequest(prompt=PROMPT, model=MODEL, steps=1)
    record = resolve_request(request, registry).model_copy(update={"webhook": receiver.url})
    store.create(record)
    store.update(record.id, cancel)  # ended: in the outbox in the same transaction
    assert client.zscore(WEBHOOKS, record.id) is not None

    assert store.take_webhooks(lease_s=0.3, limit=10) == [(record.id, 1)]  # then "killed"
    assert store.take_webhooks(lease_s=0.3, limit=10) == []  # leased
    time.sleep(0.4)
    sender = WebhookSender(store, settings, lambda job: job.model_dump_json().encode())
    receiver.statuses = [503, 503]
    ((job_id, attempt),) = store.take_webhooks(lease_s=30, limit=10)
    assert (job_id, attempt) == (record.id, 2)  # the dead deliverer's try counted
    assert not sender.deliver(job_id, attempt)  # 503 on the last allowed try: given up
    assert client.zscore(WEBHOOKS, record.id) is None
    assert len(receiver.calls) == 1
    store.close()
    client.flushdb()
    client.close()


def test_backoff_doubles_and_is_capped() -> None:
    assert [webhooks.backoff_s(k) for k in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert webhooks.backoff_s(30) == 300.0


def test_the_gateway_will_not_start_webhooks_without_a_secret() -> None:
    store = RedisJobStore(redis.Redis(), ttl_s=60)
    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        WebhookSender(store, Settings(webhook_hosts=["127.0.0.1"]), lambda job: b"")


def test_embedded_mode_keeps_an_outbox_too(tmp_path: Path) -> None:
    """The in-memory store (embedded mode) queues a webhook when a job with one ends, leases it
    and gives it up like Redis does."""
    store = MemoryJobStore(tmp_path, ttl_s=60)
    request = GenerateRequest(prompt=PROMPT, model=MODEL, steps=1)
    with_hook = resolve_request(request, load_registry(None)).model_copy(
        update={"webhook": "http://127.0.0.1:9/hook"}
    )
    without = resolve_request(request, load_registry(None))
    for record in (with_hook, without):
        store.create(record)
        store.update(record.id, cancel)
    assert store.take_webhooks(lease_s=60, limit=10) == [(with_hook.id, 1)]
    assert store.take_webhooks(lease_s=60, limit=10) == []  # leased
    store.webhook_later(with_hook.id, time.time())
    assert store.take_webhooks(lease_s=60, limit=10) == [(with_hook.id, 2)]
    store.webhook_done(with_hook.id)
    store.webhook_later(with_hook.id, time.time())
    assert store.take_webhooks(lease_s=60, limit=10) == []
