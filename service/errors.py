"""One JSON error model (`hypersd.contracts.ErrorBody`) for every 4xx/5xx answer.

On the OpenAI-compatible routes (`/v1/images/...`) errors take OpenAI's codes and names: a refused
value is a 400 (the `openai` client's `BadRequestError`), not a 422, with `param` and `code` set.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException

from hypersd.contracts import ErrorBody, ErrorDetail, RequestError
from jobs.store import STORE_DOWN
from service.request_id import HEADER

log = logging.getLogger(__name__)

_TYPES = {
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}
_OPENAI_PREFIX = "/v1/images/"

# What any route may answer: 500 (a bug), 503 (Redis is down, with Retry-After).
COMMON = (500, 503)
# What a JSON body may get: 400 (not JSON), 413 (too large), 415 (not declared JSON), 422 (a
# value refused; 400 on the OpenAI route, which the spec lists anyway).
BODY = (400, 413, 415, 422)


def errors(*codes: int) -> dict[int | str, dict[str, object]]:
    """A route's `responses=` for these error answers, all in the one error model."""
    return {code: {"model": ErrorBody} for code in codes}


class ApiError(Exception):
    """An error answer: raise it from a route or a dependency."""

    def __init__(
        self,
        status_code: int,
        type: str,
        message: str,
        *,
        job_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(type=type, message=message, job_id=job_id)
        self.headers = headers or {}


class DeadlineError(ApiError):
    """A job refused by SLA admission (`service.admission`): 429 when it is predicted to miss its
    deadline (`predicted_ms` in the body), 503 when no live worker serves its model."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        deadline_ms: float,
        retry_after_s: int,
        predicted_ms: float | None = None,
    ) -> None:
        type = "deadline_unmet" if status_code == 429 else "unavailable"
        super().__init__(status_code, type, message, headers={"Retry-After": str(retry_after_s)})
        self.detail.predicted_ms = predicted_ms
        self.detail.deadline_ms = deadline_ms


def error_response(
    status_code: int, detail: ErrorDetail, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The answer for `detail`, in the error model."""
    body = ErrorBody(error=detail).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers)


def _answer(
    request: Request,
    status_code: int,
    detail: ErrorDetail,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if request.url.path.startswith(_OPENAI_PREFIX):
        detail = detail.model_copy(update={"param": detail.field, "code": detail.code})
        if status_code == 422:
            status_code = 400
            detail.code = detail.code or "invalid_value"
    return error_response(status_code, detail, headers)


def _field(loc: tuple[int | str, ...]) -> str:
    """`("body", "steps")` -> `"steps"`; headers and query keep their place name out too."""
    parts = [str(part) for part in loc[1:]] or [str(part) for part in loc]
    return ".".join(parts)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return _answer(request, error.status_code, error.detail, error.headers or None)


async def _request_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestError)
    return _answer(request, 422, error.detail)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0]
    if first.get("type") == "json_invalid":  # its `loc` ends with a byte offset, not a field
        return _answer(request, 400, _INVALID_JSON)
    field = _field(tuple(first.get("loc", ())))
    detail = ErrorDetail(
        type="invalid_request", message=f"{field}: {first.get('msg', 'invalid')}", field=field
    )
    return _answer(request, 422, detail)


# Malformed JSON, or bytes that are not text at all: syntax, so a 400 (a 422 is for a body that
# parses but holds refused values).
_INVALID_JSON = ErrorDetail(
    type="invalid_json", message="the request body is not valid JSON", field="body"
)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    if error.status_code == 400:  # FastAPI's only 400: a body it could not decode
        return _answer(request, 400, _INVALID_JSON)
    detail = ErrorDetail(type=_TYPES.get(error.status_code, "error"), message=str(error.detail))
    return _answer(request, error.status_code, detail, dict(error.headers or {}) or None)


async def _store_down(request: Request, error: Exception) -> JSONResponse:
    """Redis (job store and broker) is down or restarting: a clear 503 to retry, not a 500."""
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, error)
    detail = ErrorDetail(
        type="unavailable", message="the job store (Redis) is unavailable; retry shortly"
    )
    return _answer(request, 503, detail, {"Retry-After": "1"})


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    # Starlette answers an unhandled error outside the app's middleware, so `RequestId` never
    # sees this response: the id goes on here, for the client to quote and the log to match.
    request_id = request.scope.get("state", {}).get("request_id")
    log.exception(
        "unhandled error on %s (request %s)", request.url.path, request_id, exc_info=error
    )
    detail = ErrorDetail(type="internal_error", message="internal server error")
    return _answer(request, 500, detail, {HEADER: request_id} if request_id else None)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for error in (*STORE_DOWN, OperationalError):  # OperationalError: Celery could not publish
        app.add_exception_handler(error, _store_down)
    app.add_exception_handler(Exception, _unexpected)
