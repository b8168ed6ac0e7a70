"""Errors as JSON: every 4xx and 5xx body is {"error": {"status", "code", "message", "details"}}.

Two sources: ApiError, raised by the HTTP layer itself (routes, guards), and the search core's
plain refusals (service.errors), answered here with the status of their kind (STATUSES)."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    Conflict,
    InvalidQuery,
    NotFound,
    ServiceError,
    TimedOut,
    TooLarge,
    Unavailable,
)

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


# the HTTP status of each kind of the core's refusals
STATUSES: dict[type[ServiceError], int] = {
    InvalidQuery: 422,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Unavailable: 503,
    TimedOut: 504,
}


def status_of_error(err: ServiceError) -> int:
    for kind in type(err).__mro__:
        if kind in STATUSES:
            return STATUSES[kind]
    return 500


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


async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    """A refusal of the search core, with its kind's status (and Retry-After when it says when)."""
    headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    return error_response(status_of_error(exc), exc.code, exc.message, exc.details, headers)


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


class ErrorLog:
    """Logs unexpected errors: the traceback of an error raised at one place (exception type, file
    and line) at most once per `interval` seconds, a one-line summary with a count otherwise, so a
    client repeating a failing request cannot flood the log."""

    MAX_PLACES = 1000
    MAX_TEXT = 200  # characters of a path or message quoted in a line

    def __init__(self, interval: float = 60.0, clock: Any = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.places: dict[tuple[str, str, int], list[float]] = {}  # -> [last traceback, repeats]

    def error(self, method: str, path: str, exc: BaseException) -> None:
        place = where_raised(exc)
        now = self.clock()
        seen = self.places.get(place)
        where = f"{method} {shorten(path, self.MAX_TEXT)}"
        if seen is None or now - seen[0] >= self.interval:
            repeats = 0 if seen is None else int(seen[1])
            if seen is None and len(self.places) >= self.MAX_PLACES:
                self.places.clear()
            self.places[place] = [now, 0]
            more = f" ({repeats} more like it since its last traceback)" if repeats else ""
            log.error("unexpected error on %s%s", where, more, exc_info=exc)
            return
        seen[1] += 1
        log.error(
            "unexpected error on %s: %s at %s:%d: %s (repeat %d; traceback at most every %gs)",
            where,
            place[0],
            Path(place[1]).name,
            place[2],
            shorten(str(exc), self.MAX_TEXT),
            int(seen[1]),
            self.interval,
        )


def where_raised(exc: BaseException) -> tuple[str, str, int]:
    filename, line = "?", 0
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename, line = frame.f_code.co_filename, lineno
    return type(exc).__qualname__, filename, line


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


INTERNAL_ERROR = ("internal_error", "internal error; the service logs say more")


class UnexpectedErrors:
    """ASGI middleware: any exception below it becomes a JSON 500 on a connection that stays
    usable, logged once (rate-limited).

    Starlette's own 500 handler re-raises the exception after answering, so uvicorn logs a second
    traceback and, as the response has been sent, closes the connection without announcing it:
    the client's next request on it got no answer. Here the exception stops.
    """

    def __init__(self, app: ASGIApp, errors: ErrorLog):
        self.app, self.errors = app, errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            self.errors.error(scope.get("method", "?"), scope.get("path", "?"), exc)
            if started:
                return  # part of a response is out: uvicorn closes the connection
            await error_response(500, *INTERNAL_ERROR)(scope, receive, send)


def install_error_handlers(app: FastAPI, errors: ErrorLog | None = None) -> None:
    """JSON error bodies for HTTP errors and invalid requests, and UnexpectedErrors innermost of
    the user middleware (so the request metrics, outside it, count its 500s)."""
    errors = errors or ErrorLog()

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # only for an error in a middleware outside UnexpectedErrors (Starlette re-raises it)
        errors.error(request.method, request.url.path, exc)
        return error_response(500, *INTERNAL_ERROR)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.add_middleware(UnexpectedErrors, errors=errors)
