"""The API's exceptions and its one error handler.

Handlers raise `ApiError`s (bad parameters, a missing token) or let the storage layer's
errors through; `handle` turns every exception into the error object of DESIGN.md,
`{"error": {"code": ..., "message": ...}}`, choosing the status by exception class. Nothing
a client sends produces a 500: a 500 means a bug or a broken database, and is logged.
"""

from __future__ import annotations

from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import (
    BadRequest,
    HeaderNotFound,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RequestTimeout,
    SanicException,
    ServiceUnavailable,
)
from sanic.response import HTTPResponse, json

from socks5_analytics.logs import get_logger
from socks5_analytics.storage.errors import (
    DatabaseUnavailableError,
    InvalidQueryError,
    SchemaMissingError,
    StorageError,
    TransientError,
)

__all__ = [
    "ApiError",
    "BadParameterError",
    "NotReadyError",
    "UnauthorizedError",
    "error_body",
    "install",
]

log = get_logger("api")


class ApiError(Exception):
    """An error the API answers with `status` and the error object."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter


class BadParameterError(ApiError):
    """A query parameter is unknown, repeated, malformed or out of range."""

    def __init__(self, parameter: str, message: str, *, code: str = "invalid_parameter") -> None:
        super().__init__(f"{parameter}: {message}", parameter=parameter)
        self.code = code


class UnauthorizedError(ApiError):
    """The route needs `Authorization: Bearer <token>` and did not get the right one."""

    status = 401
    code = "unauthorized"


class NotReadyError(ApiError):
    """The database is unreachable or its schema is not at the newest revision."""

    status = 503
    code = "not_ready"


# Sanic's own exceptions (routing, limits, timeouts), by class: (status, code).
_SANIC: tuple[tuple[type[SanicException], int, str], ...] = (
    (NotFound, 404, "not_found"),
    (MethodNotAllowed, 405, "method_not_allowed"),
    (PayloadTooLarge, 413, "request_too_large"),
    (RequestTimeout, 408, "request_timeout"),
    (ServiceUnavailable, 503, "response_timeout"),
    (HeaderNotFound, 400, "bad_request"),
    (RangeNotSatisfiable, 416, "range_not_satisfiable"),
    (BadRequest, 400, "bad_request"),
)
# The storage layer's, most specific first: (status, code, message shown to the client).
_STORAGE: tuple[tuple[type[StorageError], int, str, str | None], ...] = (
    (InvalidQueryError, 400, "invalid_query", None),
    (DatabaseUnavailableError, 503, "database_unavailable", "the database is unavailable"),
    (TransientError, 503, "database_busy", "the database did not answer in time; retry"),
    (SchemaMissingError, 503, "schema_missing",
     "the database schema is missing or old: run `socks5-analytics migrate`"),
)


def error_body(code: str, message: str, parameter: str | None = None) -> dict[str, Any]:
    """The error object of DESIGN.md (`parameter` names the culprit when there is one)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if parameter is not None:
        error["parameter"] = parameter
    return {"error": error}


def _classify(exc: BaseException) -> tuple[int, str, str, str | None, dict[str, str]]:
    """Status, code, message, parameter and extra headers for `exc`."""
    if isinstance(exc, UnauthorizedError):
        return exc.status, exc.code, exc.message, None, {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message, exc.parameter, {}
    for storage_class, status, code, shown in _STORAGE:
        if isinstance(exc, storage_class):
            return status, code, shown or str(exc), None, {}
    for sanic_class, status, code in _SANIC:
        if isinstance(exc, sanic_class):
            headers = {}
            if isinstance(exc, MethodNotAllowed):
                headers["Allow"] = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            return status, code, str(exc.args[0]) if exc.args else code, None, headers
    if isinstance(exc, SanicException) and 400 <= exc.status_code < 500:
        return exc.status_code, "bad_request", str(exc), None, {}
    return 500, "internal_error", "internal error (logged)", None, {}


async def handle(request: Request, exc: BaseException) -> HTTPResponse:
    """The one error handler: every exception becomes the error object."""
    status, code, message, parameter, headers = _classify(exc)
    if status >= 500 and status != 503:
        log.error("request failed", path=request.path, exc_info=exc)
    elif status == 503:
        log.warning("request failed", path=request.path, code=code, error=str(exc))
    return json(error_body(code, message, parameter), status=status,
                headers={k: v for k, v in headers.items() if v})


def install(app: Sanic[Any, Any]) -> None:
    """Make `handle` the app's handler for every exception."""
    app.error_handler.add(Exception, handle)
