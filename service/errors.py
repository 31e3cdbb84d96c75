"""One JSON error model (`hypersd.contracts.ErrorBody`) for every 4xx/5xx answer."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException

from hypersd.contracts import ErrorBody, ErrorDetail, RequestError
from jobs.store import STORE_DOWN

log = logging.getLogger(__name__)

_TYPES = {404: "not_found", 405: "method_not_allowed", 409: "conflict", 503: "unavailable"}


class ApiError(Exception):
    """An error answer: raise it from a route or a dependency."""

    def __init__(self, status_code: int, type: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(type=type, message=message)
        self.headers = headers


def _answer(
    status_code: int, detail: ErrorDetail, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=detail).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers)


def _field(loc: tuple[int | str, ...]) -> str:
    """`("body", "steps")` -> `"steps"`; headers and query keep their place name out too."""
    parts = [str(part) for part in loc[1:]] or [str(part) for part in loc]
    return ".".join(parts)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return _answer(error.status_code, error.detail, error.headers or None)


async def _request_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestError)
    return _answer(422, error.detail)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0]
    field = _field(tuple(first.get("loc", ())))
    detail = ErrorDetail(
        type="invalid_request", message=f"{field}: {first.get('msg', 'invalid')}", field=field
    )
    return _answer(422, detail)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    detail = ErrorDetail(type=_TYPES.get(error.status_code, "error"), message=str(error.detail))
    return _answer(error.status_code, detail, dict(error.headers or {}) or None)


async def _store_down(request: Request, error: Exception) -> JSONResponse:
    """Redis (job store and broker) is down or restarting: a clear 503 to retry, not a 500."""
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, error)
    detail = ErrorDetail(
        type="unavailable", message="the job store (Redis) is unavailable; retry shortly"
    )
    return _answer(503, detail, {"Retry-After": "1"})


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path, exc_info=error)
    return _answer(500, ErrorDetail(type="internal_error", message="internal server error"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for error in (*STORE_DOWN, OperationalError):  # OperationalError: Celery could not publish
        app.add_exception_handler(error, _store_down)
    app.add_exception_handler(Exception, _unexpected)
