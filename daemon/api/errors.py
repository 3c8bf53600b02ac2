"""Every HTTP error as JSON, and the handlers that produce it.

editd's routes answer ``{"error": {"message": str, "field": str | null, "type": str}}``
where ``type`` is a short code for the status (``"not_found"``, ``"conflict"``,
``"validation_error"`` ...). The OpenAI-compatible routes (:func:`is_openai_path`)
answer in OpenAI's shape instead, ``{"error": {"message", "type", "param", "code"}}``,
so that OpenAI's client libraries raise their usual exceptions: ``type`` is
``invalid_request_error`` for a client's mistake (``rate_limit_error`` for 429,
``server_error`` for 5xx), ``param`` the field at fault, ``code`` a specific reason
(``model_not_found``, ``invalid_api_key``, ``unknown_parameter`` ...), and a
validation error is 400 there, not 422. editd's own errors are mapped by class (the
most specific class in :data:`STATUS_BY_ERROR` wins); anything else is a server
fault: logged with its traceback and answered with a JSON 500 that hides the details.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from daemon.errors import (
    BlockCapacityError,
    ChatTemplateError,
    CheckpointError,
    DaemonNotReadyError,
    DriftDisabledError,
    EditConflictError,
    EditdError,
    EditNotFoundError,
    EditValidationError,
    IdempotencyConflictError,
    InvalidTransitionError,
    NotBuiltYetError,
    RecordNotFoundError,
    StoreBusyError,
    StoreUnavailableError,
)

log = structlog.get_logger()

TYPE_BY_STATUS: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
}

STATUS_BY_ERROR: Mapping[type[EditdError], int] = {
    EditNotFoundError: 404,
    RecordNotFoundError: 404,
    InvalidTransitionError: 409,
    IdempotencyConflictError: 409,
    EditConflictError: 409,
    EditValidationError: 422,
    StoreBusyError: 503,
    StoreUnavailableError: 503,
    BlockCapacityError: 503,
    NotBuiltYetError: 501,
    DaemonNotReadyError: 503,
    DriftDisabledError: 409,
    CheckpointError: 409,
    ChatTemplateError: 400,
}
"""editd errors that a client caused or can wait out; other ``EditdError``s are 500s."""


OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})
OPENAI_TYPE_BY_STATUS: Mapping[int, str] = {429: "rate_limit_error"}
"""OpenAI's error ``type`` where it is not ``invalid_request_error`` (below 500) or
``server_error`` (500 and above)."""
OPENAI_CODE_BY_STATUS: Mapping[int, str] = {
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
    429: "rate_limit_exceeded",
    501: "not_implemented",
    503: "unavailable",
}
OPENAI_CODE_BY_VALIDATION: Mapping[str, str] = {
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
}
"""OpenAI's ``code`` for a pydantic error type; any other validation error is ``invalid_value``."""


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is an OpenAI-compatible route (its errors have OpenAI's shape)."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


class ApiError(Exception):
    """An error the API layer raises itself (a limit, a missing token, not ready);
    ``code`` is the OpenAI error code on the OpenAI-compatible routes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        self.code = code


class SafeJSONResponse(JSONResponse):
    """JSON escaped to ASCII, so text with lone surrogates can never fail to encode."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        return text.encode("ascii")


def error_response(
    status: int,
    message: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    path: str = "",
    code: str | None = None,
) -> SafeJSONResponse:
    """The JSON error response for ``status`` on the route ``path``: OpenAI's shape on
    the OpenAI-compatible routes (where 422 becomes 400), editd's elsewhere."""
    if is_openai_path(path):
        return openai_error_response(status, message, param=field, code=code, headers=headers)
    body = {
        "error": {
            "message": message,
            "field": field,
            "type": TYPE_BY_STATUS.get(status, "error"),
        }
    }
    return SafeJSONResponse(body, status_code=status, headers=dict(headers or {}))


def openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body (a validation error's status is 400 there)."""
    if status >= 500:
        kind = "server_error"
    else:
        kind = OPENAI_TYPE_BY_STATUS.get(status, "invalid_request_error")
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code if code is not None else OPENAI_CODE_BY_STATUS.get(status),
        }
    }


def openai_error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> SafeJSONResponse:
    """An error response in OpenAI's shape; 422 is sent as 400, as OpenAI does."""
    status = 400 if status == 422 else status
    body = openai_error(status, message, param=param, code=code)
    return SafeJSONResponse(body, status_code=status, headers=dict(headers or {}))


def status_of(error: EditdError) -> int:
    """The HTTP status for one of editd's errors (walks the class hierarchy)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the JSON error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EditdError, _editd_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.message,
        field=exc.field,
        headers=exc.headers,
        path=request.url.path,
        code=exc.code,
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors: list[Mapping[str, Any]] = list(exc.errors())
    path = request.url.path
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "request body is not valid JSON", path=path, code="invalid_json")
    first = _most_telling(errors)
    field = _field_name(first.get("loc", ()))
    message = str(first.get("msg", "invalid request"))
    others = {_field_name(e.get("loc", ())) for e in errors} - {field}
    if others:
        message = f"{message} (and problems in {len(others)} other field(s))"
    code = OPENAI_CODE_BY_VALIDATION.get(str(first.get("type", "")), "invalid_value")
    return error_response(422, message, field=field, path=path, code=code)


def _most_telling(errors: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The first error that is not a plain wrong-type error (in a union, the branch that
    fits the input's type explains the problem best), else the first error."""
    for error in errors:
        if not str(error.get("type", "")).endswith("_type"):
            return error
    return errors[0] if errors else {}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, message, headers=exc.headers, path=request.url.path)


async def _editd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EditdError)
    status = status_of(exc)
    if status >= 500:
        log.error(
            "api_request_failed",
            method=request.method,
            path=request.url.path,
            error=type(exc).__name__,
            message=exc.message,
            exc_info=exc,
        )
        message = exc.message if status != 500 else "internal error"
        return error_response(status, message, headers=_retry_after(status), path=request.url.path)
    field = exc.context.get("field")
    return error_response(
        status,
        exc.message,
        field=field if isinstance(field, str) else None,
        path=request.url.path,
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error(
        "api_request_crashed",
        method=request.method,
        path=request.url.path,
        error=type(exc).__name__,
        exc_info=exc,
    )
    return error_response(500, "internal error", path=request.url.path)


def _retry_after(status: int) -> dict[str, str]:
    return {"Retry-After": "1"} if status == 503 else {}


def _field_name(loc: object) -> str | None:
    """``("body", "edits", 3)`` -> ``"edits.3"``; the location kind and union tags are dropped."""
    if not isinstance(loc, list | tuple):
        return None
    parts = list(loc)
    if parts and parts[0] in {"body", "query", "path", "header", "cookie"}:
        parts = parts[1:]
    names: list[str] = []
    for part in parts:
        if isinstance(part, str) and (not part.isidentifier() or part in _TYPE_TAGS):
            break  # a union member's tag such as "list[str]" or "function-after[...]"
        names.append(str(part))
    return ".".join(names) or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
