"""Webhooks: a job's end POSTed, signed, to the URL its request named (torch-free).

Delivery is at least once. The job store adds the job to its webhook outbox in the very
transaction that ends the job (`JobStore.update`), whoever ends it: a worker, a cancel, the reaper
of a killed worker's job, a shutdown. A `WebhookSender` thread in each gateway takes due webhooks
under a lease (a gateway killed mid-delivery leaves the webhook due again when the lease runs out),
POSTs them and retries a failure after 1, 2, 4... s (capped at 5 min), up to
`webhook_max_attempts` tries; then it gives up and logs it. The receiver may see one delivery more
than once and should key on `id` (plus `status`).

Signature: `X-Hypersd-Signature: sha256=<hex>`, the HMAC-SHA256 under `webhook_secret` of
`<X-Hypersd-Timestamp>.<raw body>`; `verify` checks one (and the timestamp's age, against replays).

Safety: a URL must be http(s), name a host on `webhook_hosts`, and resolve only to public
addresses, unless the address itself is listed too (e.g. `127.0.0.1` for a local receiver); it is
checked at submit (a 422 naming `webhook`) and again before every delivery (a name may resolve
elsewhere by then). Redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from jobs.record import JobRecord
from jobs.settings import Settings
from jobs.store import JobStore

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Hypersd-Signature"
TIMESTAMP_HEADER = "X-Hypersd-Timestamp"
_MAX_BACKOFF_S = 300.0
_POLL_S = 0.5  # how often the outbox is looked at
_SCHEMES = {"http": 80, "https": 443}

Resolver = Callable[[str, int], Collection[str]]


def resolve(host: str, port: int) -> set[str]:
    """The addresses `host` resolves to (what a connection to it could reach)."""
    return {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}


def check_url(url: str, hosts: Collection[str], resolver: Resolver = resolve) -> None:
    """Refuse a webhook URL the deployment must not call.

    Args:
        url: The job's `webhook`.
        hosts: The allow-list (`webhook_hosts`): host names or addresses.
        resolver: Host name -> addresses (a test may pin one).

    Raises:
        ValueError: naming why: webhooks off, a scheme other than http/https, a host not listed,
            a name that does not resolve, or an address that is loopback, private, link-local or
            otherwise not public and not listed itself.
    """
    if not hosts:
        raise ValueError("webhooks are not enabled on this deployment (no HYPERSD_WEBHOOK_HOSTS)")
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"webhook scheme {parts.scheme!r} is not allowed; allowed: http, https")
    host = (parts.hostname or "").lower()
    if not host or parts.username is not None or parts.password is not None:
        raise ValueError("a webhook URL names a host, without user or password")
    allowed = {name.lower() for name in hosts}
    if host not in allowed:
        raise ValueError(f"webhook host {host!r} is not on the allow-list")
    try:
        port = parts.port or _SCHEMES[parts.scheme]
        addresses = resolver(host, port)
    except (OSError, ValueError) as error:
        raise ValueError(f"webhook host {host!r} does not resolve ({error})") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global and str(ip) not in allowed:
            raise ValueError(
                f"webhook host {host!r} resolves to {ip}, a non-public address (loopback, "
                "private or link-local): list that address too to allow it"
            )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Hypersd-Signature` value of `body` sent at `timestamp` (Unix seconds, as sent)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def verify(
    secret: str, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300
) -> bool:
    """What a receiver runs: whether `signature` is ours for this body and timestamp, and the
    timestamp is within `tolerance_s` of now (an old delivery replayed is refused).

    Args:
        secret: The shared `webhook_secret`.
        timestamp: The `X-Hypersd-Timestamp` header.
        body: The raw request body, before any JSON parsing.
        signature: The `X-Hypersd-Signature` header.
        tolerance_s: The oldest (or most future) timestamp accepted, in seconds.
    """
    try:
        age = abs(time.time() - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST `body` to `url` (no redirect followed); returns the HTTP status."""
    parts = urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        path = parts.path or "/"
        connection.request("POST", f"{path}?{parts.query}" if parts.query else path, body, headers)
        return connection.getresponse().status
    finally:
        connection.close()


def backoff_s(attempt: int) -> float:
    """The wait after failed try number `attempt` (from 1): 1, 2, 4... s, capped at 5 min."""
    return float(min(2 ** (attempt - 1), _MAX_BACKOFF_S))


class WebhookSender:
    """A thread delivering the store's due webhooks (a few at a time, in a small pool).

    Args:
        store: The job store (its outbox).
        settings: `webhook_hosts`, `webhook_secret`, `webhook_max_attempts`, `webhook_timeout_s`.
        render: A job -> the JSON body sent (the gateway's public view of the job).
        resolver: Host name -> addresses, for the check before each delivery.
    """

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        render: Callable[[JobRecord], bytes],
        resolver: Resolver = resolve,
    ) -> None:
        if settings.webhook_secret is None:
            raise ValueError("HYPERSD_WEBHOOK_HOSTS needs HYPERSD_WEBHOOK_SECRET to sign with")
        self.store = store
        self.settings = settings
        self.secret = settings.webhook_secret.get_secret_value()
        self.render = render
        self.resolver = resolver
        # a lease outlasting a delivery: another gateway takes it only after this one gave up
        self.lease_s = 2 * settings.webhook_timeout_s + 5
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop taking webhooks; ones being delivered finish (a lease covers the rest)."""
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.wait(_POLL_S):
            try:
                taken = self.store.take_webhooks(self.lease_s, limit=16)
            except Exception:  # Redis down: the outbox waits for it
                log.warning("webhooks: the job store is unavailable", exc_info=True)
                continue
            for job_id, attempt in taken:
                self._pool.submit(self.deliver, job_id, attempt)

    def deliver(self, job_id: str, attempt: int) -> bool:
        """Try one delivery of `job_id`'s webhook; returns whether it was delivered."""
        record = self.store.get(job_id)
        if record is None or record.webhook is None:
            self.store.webhook_done(job_id)  # expired meanwhile: nothing left to tell
            return False
        body = self.render(record)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "hypersd-webhook",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        try:
            check_url(record.webhook, self.settings.webhook_hosts, self.resolver)
        except ValueError as error:  # the allow-list or DNS changed since submit: never retried
            log.warning("webhook of job %s refused: %s", job_id, error)
            self.store.webhook_done(job_id)
            return False
        try:
            status = post(record.webhook, body, headers, self.settings.webhook_timeout_s)
            problem = None if 200 <= status < 300 else f"HTTP {status}"
        except OSError as error:
            problem = str(error) or type(error).__name__
        if problem is None:
            self.store.webhook_done(job_id)
            log.info("webhook of job %s delivered (try %d)", job_id, attempt)
            return True
        if attempt >= self.settings.webhook_max_attempts:
            log.error("webhook of job %s failed %d times (%s): given up", job_id, attempt, problem)
            self.store.webhook_done(job_id)
        else:
            log.warning("webhook of job %s failed (%s): try %d again", job_id, problem, attempt + 1)
            self.store.webhook_later(job_id, time.time() + backoff_s(attempt))
        return False
