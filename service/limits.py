"""Request body size limits, enforced before and while the body is read (ASGI middleware).

A declared Content-Length over the limit is refused at once, without reading the body. A body sent
without one (chunked) is counted as it streams in and refused as soon as it passes the limit, so
an oversized upload is never held in memory or spooled to disk whole.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response

UPLOAD_PATHS = ("/v1/search/image",)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, what: str):
        super().__init__(
            413,
            "body_too_large",
            f"{what} is larger than the limit of {limit:,} bytes",
            {"limit_bytes": limit},
        )


class BodySizeLimit:
    """413 for request bodies over `upload_limit` (upload routes) or `other_limit` (the rest)."""

    def __init__(
        self,
        app: ASGIApp,
        upload_limit: int,
        other_limit: int,
        upload_paths: Iterable[str] = UPLOAD_PATHS,
    ):
        self.app = app
        self.upload_limit = upload_limit
        self.other_limit = other_limit
        self.upload_paths = tuple(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = self.limit_for(scope["path"])
        declared = content_length(scope)
        if declared is not None and declared > limit:
            error = BodyTooLarge(limit, what)
            response = error_response(413, error.code, error.message, error.details)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, counting_receive(receive, limit, what), send)

    def limit_for(self, path: str) -> tuple[int, str]:
        if path.rstrip("/").endswith(self.upload_paths):
            return self.upload_limit, "the upload"
        return self.other_limit, "the request body"


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def counting_receive(receive: Receive, limit: int, what: str) -> Receive:
    """`receive` that raises BodyTooLarge once more than `limit` body bytes have arrived."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit, what)
        return message

    return limited
