"""What the service core (search/, model/) refuses, as plain exceptions: a kind, a stable code and
a message for whoever asked, no HTTP.

The kind says what went wrong (the query, an id that is not there, something busy or slow);
service/api/errors.py answers each kind with its HTTP status, and `retry_after` as Retry-After.
A new refusal raises one of these kinds with a code of its own; a new kind needs its status there.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A refusal the caller can act on: `code` is machine-readable (e.g. unknown_id), `message`
    says what to do, `details` (JSON-able) adds to it, `retry_after` (seconds) says when to ask
    again."""

    def __init__(
        self, code: str, message: str, details: Any = None, retry_after: int | None = None
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after


class InvalidQuery(ServiceError):
    """The query cannot be run as asked: a filter the index cannot run, a bad image or box."""


class NotFound(ServiceError):
    """An id the served index version does not hold, or an indexed file that is gone."""


class TooLarge(ServiceError):
    """An image with more pixels than the decoder takes."""


class Conflict(ServiceError):
    """The served index version cannot answer this (built before what it needs)."""


class Unavailable(ServiceError):
    """Busy or failing for now (a PACS, the heat-map worker): `retry_after` says when to retry."""


class TimedOut(ServiceError):
    """Something the answer waits on (a PACS) took longer than its deadline."""
