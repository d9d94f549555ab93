"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

A client's mistake is always a 4xx with a message saying what to change; only our own faults are 500,
and those never echo internals (the traceback goes to the log). `api_error` is the one table from the
exceptions of the library and the scheduler to these answers.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rugpt.errors import ModelNotFound, RugptError
from rugpt.serve.scheduler import Busy, DuplicateRequestId, NotReady, Refused
from rugpt.serve.schemas import ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An answer other than success, as OpenAI shapes it; `headers` carries e.g. Retry-After."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        fields = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {name: _encodable(value) for name, value in fields.items()}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# What each status means on this server, for the OpenAPI page: a schema-driven client or fuzzer must never meet
# an undocumented one. Validation errors are 400 here (never FastAPI's 422), so 422 is left out of the spec.
STATUS_MEANINGS = {
    400: "the request is invalid: the message names the field and what is allowed",
    401: "missing or invalid API key (when the server has keys)",
    404: "no such model, request id or route",
    409: "a request with this X-Request-Id is already waiting or running",
    413: "the request body is larger than the server's limit",
    429: "too many requests waiting, or too many of this API key: retry after Retry-After seconds",
    500: "a fault of the server's own (the log has the details)",
    503: "the server is starting, shutting down, or the request waited too long for a slot",
    504: "the request took longer than the server's limit",
}
GENERATION_ERRORS = (400, 401, 404, 409, 429, 503, 504)
EVERY_ROUTE = (413, 500)  # the body-size limit and our own faults can answer on any route


def documented(*statuses: int) -> dict[int | str, dict]:
    """FastAPI `responses=` documenting these error statuses in OpenAI's error shape."""
    return {status: {"model": ErrorResponse, "description": STATUS_MEANINGS[status]} for status in statuses}


def document_every_route(spec: dict) -> dict:
    """The app's OpenAPI spec with the statuses any route may answer and without 422, which it never answers."""
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _error_doc(400))
            for status in EVERY_ROUTE:
                responses.setdefault(str(status), _error_doc(status))
    schemas = spec.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec


def _error_doc(status: int) -> dict:
    return {"description": STATUS_MEANINGS[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_many(message: str, retry_after: float | None, code: str) -> APIError:
    seconds = str(max(1, math.ceil(retry_after or 1)))
    return APIError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": seconds})


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code)


def _encodable(value: str | None) -> str | None:
    """A message that echoes a client's value may hold a lone surrogate (JSON allows "\\ud800"), which UTF-8
    cannot encode; it is shown escaped instead of failing the answer."""
    return value if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


def api_error(exc: BaseException) -> APIError:
    """The answer for an exception raised while serving a request: the scheduler's refusals, a library
    error caused by the request's values (4xx), or a fault of ours (500, logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Busy):
        return too_many(str(exc), exc.retry_after, exc.reason)
    if isinstance(exc, NotReady):
        return unavailable(str(exc), exc.reason)
    if isinstance(exc, DuplicateRequestId):
        return APIError(409, str(exc), code=exc.reason, param="X-Request-Id")
    if isinstance(exc, RugptError):
        return from_rugpt_error(exc)
    return internal(exc)


def from_rugpt_error(exc: RugptError) -> APIError:
    """A library error raised by a request's values (a setting, a prompt) is the client's to fix."""
    if isinstance(exc, ModelNotFound):
        return APIError(404, str(exc), code="model_not_found")
    return bad_request(str(exc))


def internal(exc: BaseException) -> APIError:
    log.error("internal error while serving a request", exc_info=exc)
    return APIError(500, "internal server error; the server log has the details", type="server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def install_handlers(app: FastAPI) -> None:
    """Every error leaves the server in OpenAI's shape, with the status that says whose fault it is."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(RugptError)
    @app.exception_handler(Refused)
    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal(exc).response()
