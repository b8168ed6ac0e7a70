"""Errors as JSON: every 4xx and 5xx body is {"error": {"status", "code", "message", "details"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """A client-facing error with a stable machine-readable code and a human message.

    A subclass of Starlette's HTTPException so that FastAPI passes it through unchanged even when
    it is raised while the request body is being read (the upload size limit).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.details = details


def error_body(status: int, code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, details), status, headers=headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)
    code = DEFAULT_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one line per problem; the offending input is never echoed back (it may be huge)."""
    details = [describe_problem(err) for err in exc.errors()]
    message = "; ".join(f"{d['field']}: {d['problem']}" for d in details) or "invalid request"
    return error_response(422, "invalid_request", message, details)


def describe_problem(err: dict[str, Any]) -> dict[str, str]:
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return {"field": "body", "problem": f"not valid JSON ({reason})".replace(" ()", "")}
    field = ".".join(str(part) for part in err.get("loc", ()))
    return {"field": field, "problem": str(err.get("msg", "invalid"))}


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; the service logs say more")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
