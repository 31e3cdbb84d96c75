"""Request bodies: at most `max_body_bytes`, and JSON — checked before anything reads them.

A pure ASGI middleware, so a body that is too large is refused from its `Content-Length` (413)
without reading a byte, and a chunked one as soon as it passes the limit, instead of being read
whole and parsed before the 422 (three 200 MB bodies took the gateway from 0.7 to 1.8 GB). A body
that is not declared JSON is a 415: every route with a body takes JSON.
"""

from __future__ import annotations

import email.message

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypersd.contracts import ErrorDetail
from service.errors import error_response


def _too_large(limit: int) -> str:
    return f"the request body is over {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a chunked body is read past the limit: an `HTTPException`,
    because FastAPI turns any other error of a body read into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(limit))


def is_json(content_type: str) -> bool:
    """`application/json` or `application/<something>+json`, with any parameters."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class BodyLimits:
    """413 past `max_bytes`, 415 for a body that is not JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
        }
        length = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (length is not None and length != "0")
        refused: tuple[int, ErrorDetail] | None = None
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            refused = 413, ErrorDetail(type="payload_too_large", message=_too_large(self.max_bytes))
        elif has_body and not is_json(headers.get("content-type", "")):
            message = "the request body must be JSON (Content-Type: application/json)"
            refused = 415, ErrorDetail(type="unsupported_media_type", message=message)
        if refused is not None:
            # Not read: the server closes the connection rather than draining a large body.
            await error_response(*refused, {"Connection": "close"})(scope, receive, send)
            return

        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
