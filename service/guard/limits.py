"""Request limits: body size and body read time (ASGI middleware), head size and head read time
(uvicorn's HTTP protocol).

A declared Content-Length over the limit is refused at once, without reading the body. A body sent
without one (chunked) is counted as it streams in and refused as soon as it passes the limit, so
an oversized upload is never held in memory or spooled to disk whole. A client too slow to send
its request head or body is answered 408 and disconnected; a head over the size cap gets a 431.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ApiError, error_body, error_response

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


# -- slow clients: a deadline for the request head and body, a cap on the head's size --------------


class RequestTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(
            408,
            "request_timeout",
            f"the request body did not arrive within {seconds:g} s",
            {"timeout_seconds": seconds},
            headers={"Connection": "close"},
        )


class BodyReadDeadline:
    """408 (and the connection closed) when the body takes longer than `seconds` to arrive.

    The clock starts when the request head has arrived. It only bounds waiting for body bytes:
    once the last body part is in, the app may take as long as it needs.
    """

    def __init__(self, app: ASGIApp, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def bounded() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()  # waiting for http.disconnect: not a body read
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(self.seconds) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, bounded, send)


def raw_error(status: int, reason: str, code: str, message: str, details: Any = None) -> bytes:
    """A complete JSON error response that closes the connection, for the protocol layer."""
    body = json.dumps(error_body(status, code, message, details)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def guarded_protocol(head_timeout: float, max_head_bytes: int) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a deadline and a size cap for the request head.

    uvicorn has neither: its keep-alive timeout only runs while a connection is idle between
    requests, and any byte received cancels it, so a client sending one header byte a second (or
    one that connects and sends nothing) holds its connection for ever, and a head without an end
    is buffered whole. Here a connection must deliver a complete request head within
    `head_timeout` seconds of opening or of its previous response, or it is closed (with a 408 if
    it had started one); a head over `max_head_bytes` gets a 431 and the connection is closed.
    Without httptools (uvicorn's h11 then), only h11's own size cap applies: returns "h11".
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        return "h11"

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        head_deadline: asyncio.TimerHandle | None = None
        head_bytes = 0  # received since the current head began (while one is being read)
        in_head = True  # the parser is reading a request head (or waiting for one)
        bytes_since_armed = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self.arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_head_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            self.bytes_since_armed += len(data)
            if self.in_head:
                self.head_bytes += len(data)
            super().data_received(data)
            if self.in_head and self.head_bytes > max_head_bytes:
                self.refuse(
                    raw_error(
                        431,
                        "Request Header Fields Too Large",
                        "headers_too_large",
                        f"the request head is larger than the limit of {max_head_bytes:,} bytes",
                        {"limit_bytes": max_head_bytes},
                    )
                )

        # httptools parser callbacks
        def on_message_begin(self) -> None:
            self.in_head = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.in_head = False
            self.head_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.in_head = True  # the next bytes on this connection start a new head
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm_head_deadline()

        def arm_head_deadline(self) -> None:
            self.disarm_head_deadline()
            self.bytes_since_armed = 0
            self.head_deadline = self.loop.call_later(head_timeout, self.head_timed_out)

        def disarm_head_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def head_timed_out(self) -> None:
            self.head_deadline = None
            waiting = self.cycle is None or self.cycle.response_complete
            if not waiting or self.transport.is_closing():
                return  # a request is being served; its response re-arms the deadline
            if self.bytes_since_armed == 0:
                self.transport.close()  # idle: nothing to answer
                return
            self.refuse(
                raw_error(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    f"the request head did not arrive within {head_timeout:g} s",
                    {"timeout_seconds": head_timeout},
                )
            )

        def refuse(self, response: bytes) -> None:
            self.disarm_head_deadline()
            self.transport.write(response)
            self.transport.close()

    return GuardedHttpToolsProtocol
