"""`X-Request-Id` on every response: the client's own (when it is a sane token) or a new one.

A client or proxy that sends an id sees it back and can match its logs with the gateway's; one
that sends none (or something that is not a short token: the header is echoed, so it is never
arbitrary text) gets a fresh id.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.logs import REQUEST_ID

HEADER = "X-Request-Id"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestId:
    """Pure ASGI: sets `X-Request-Id` on the response and `scope["state"]["request_id"]`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.lower().encode(), b"").decode("latin-1")
        request_id = sent if _SANE.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = REQUEST_ID.set(request_id)  # in this request's log records (`jobs.logs`)
        try:
            await self.app(scope, receive, with_id)
        finally:
            REQUEST_ID.reset(token)
