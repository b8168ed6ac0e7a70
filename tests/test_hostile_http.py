"""Faults a hostile HTTP client found (issue 10: 7, 8, 10, 12), each checked against a real
`convirt serve` process on loopback with raw sockets.

The server here has short read deadlines (so the slow-client tests finish in seconds), a Host
allow-list and the test-only route that fails on purpose.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import server_settings
from serving import LOOPBACK, ServerProcess
from test_service import bundle, index_root, rows  # noqa: F401 (module fixtures)

from service.settings import Settings

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
MAX_HEADER_BYTES = Settings.model_fields["max_header_bytes"].default
SLACK = 2.0  # seconds of scheduling slack on two shared cores


@pytest.fixture(scope="module")
def server(bundle_dir, index_root) -> Iterator[ServerProcess]:  # noqa: F811
    settings = server_settings(
        bundle_dir,
        index_root,
        CONVIRT_HEADER_TIMEOUT=HEADER_TIMEOUT,
        CONVIRT_BODY_TIMEOUT=BODY_TIMEOUT,
        CONVIRT_ALLOWED_HOSTS=f"{LOOPBACK},test",
        CONVIRT_FAULT_ROUTE="1",
    )
    with ServerProcess(settings) as process:
        yield process


# -- raw HTTP helpers ------------------------------------------------------------------------------


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection((LOOPBACK, server.port), timeout=30)


def get(path: str, host: str = "test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def read_response(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """One response (head and Content-Length body), or what came before the server closed."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if len(body) >= length:
                return data
        try:
            part = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not part:
            return data
        data += part


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def json_body(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def trickle_until_closed(
    sock: socket.socket, data: bytes, interval: float, limit: float
) -> tuple[float, bytes]:
    """Send `data` one byte every `interval` seconds until the server answers or closes, for at
    most `limit` seconds; (seconds until then, what it sent). Still open at the limit: fails."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        sock.settimeout(interval)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            assert time.monotonic() - started < limit, "the slow client is still connected"
            continue
        except ConnectionResetError:
            answer = b""
        return time.monotonic() - started, answer + read_response(sock, timeout=5)
    return time.monotonic() - started, read_response(sock, timeout=5)


# -- 8. slow and oversized clients -----------------------------------------------------------------


def test_slow_header_client_is_answered_408_and_disconnected(server):
    """A head sent one byte every 0.2 s is cut off after the header timeout, not held for ever."""
    head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 1000
    with connect(server) as sock:
        took, answer = trickle_until_closed(sock, head, 0.2, HEADER_TIMEOUT + SLACK)
    assert took < HEADER_TIMEOUT + SLACK
    assert status_of(answer) == 408
    assert json_body(answer)["error"]["code"] == "request_timeout"
    assert b"connection: close" in answer.lower()


def test_idle_connection_is_closed_after_the_header_timeout(server):
    """A connection that never sends a byte (how 2 x 10,000 of them exhausted the descriptors)
    is closed silently after the header timeout."""
    with connect(server) as sock:
        started = time.monotonic()
        answer = read_response(sock, timeout=HEADER_TIMEOUT + SLACK)
        took = time.monotonic() - started
    assert answer == b"" and took < HEADER_TIMEOUT + SLACK


def test_slow_body_client_gets_408_after_the_body_timeout(server):
    head = (
        b"POST /v1/search/text HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head)
        took, answer = trickle_until_closed(sock, b" " * 1000, 0.2, BODY_TIMEOUT + SLACK)
        assert sock.recv(10) == b""  # closed after the 408
    assert took < BODY_TIMEOUT + SLACK
    assert status_of(answer) == 408
    assert json_body(answer)["error"]["code"] == "request_timeout"


def test_many_slow_clients_do_not_hold_the_server(server):
    """200 clients trickling their heads: /healthz keeps answering meanwhile, and every one of
    them is disconnected by the header timeout."""
    clients = [connect(server) for _ in range(200)]
    try:
        for sock in clients:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            sock.setblocking(False)
        latencies = []
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT * 0.75:
            for sock in clients:
                with contextlib.suppress(OSError):
                    sock.send(b"x")
            began = time.monotonic()
            assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
            latencies.append(time.monotonic() - began)
            time.sleep(0.1)
        assert max(latencies) < 1.0, latencies
        deadline = started + HEADER_TIMEOUT + SLACK + 2
        open_ = list(clients)
        while open_ and time.monotonic() < deadline:
            still = []
            for sock in open_:
                try:
                    if sock.recv(65536) == b"":
                        continue
                except BlockingIOError:
                    still.append(sock)
                    continue
                except ConnectionResetError:
                    continue
                still.append(sock)  # the 408 arrived; the close follows
            open_ = still
            time.sleep(0.1)
        assert not open_, f"{len(open_)} of 200 slow clients still connected"
    finally:
        for sock in clients:
            sock.close()
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_endless_header_is_refused_early_with_memory_bounded(server):
    """A header line that never ends (the probe sent 100 MB) gets a 431 after about
    max_header_bytes, and the server's memory does not grow with what the client sends."""
    before = server.rss_bytes()
    peak = before or 0
    sent = 0
    block = b"a" * 65536
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: ")
        try:
            while sent < 100 * 1024 * 1024:
                sock.sendall(block)
                sent += len(block)
                if sent % (1024 * 1024) == 0:
                    peak = max(peak, server.rss_bytes() or 0)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_response(sock, timeout=10)
    peak = max(peak, server.rss_bytes() or 0)
    assert sent < 4 * 1024 * 1024, f"the server read {sent:,} bytes of one header"
    if answer:  # the 431 may be lost when the kernel resets the connection with data unread
        assert status_of(answer) == 431, answer[:200]
        assert json_body(answer)["error"]["code"] == "headers_too_large"
    if before is not None:
        assert peak - before < 16 * 1024 * 1024, (before, peak)
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_header_under_the_limit_is_served(server):
    big = b"x" * (MAX_HEADER_BYTES // 2)
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + big + b"\r\n\r\n")
        assert status_of(read_response(sock)) == 200


# -- 12. the Host header ---------------------------------------------------------------------------


def test_untrusted_host_header_is_refused(server):
    with connect(server) as sock:
        sock.sendall(get("/healthz", host="evil.example"))
        assert status_of(read_response(sock)) == 400
    with connect(server) as sock:
        sock.sendall(get("/healthz", host="test"))
        assert status_of(read_response(sock)) == 200
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200  # Host: 127.0.0.1:port


# -- 7 and 10. unexpected errors ------------------------------------------------------------------
# No request makes this service fail on purpose (the fuzz test in test_service.py checks that), so
# the server here has CONVIRT_FAULT_ROUTE on: GET /_fault raises an unexpected exception.


def test_500_leaves_the_keep_alive_connection_usable(server):
    """Starlette re-raised the error after its 500, and uvicorn then closed the connection without
    a `Connection: close`: the next request on it got nothing. Now it is answered."""
    with connect(server) as sock:
        sock.sendall(get("/_fault"))
        first = read_response(sock)
        assert status_of(first) == 500, first[:300]
        assert json_body(first)["error"]["code"] == "internal_error"
        sock.sendall(get("/healthz"))
        second = read_response(sock)
    if b"connection: close" not in first.lower():
        assert second, "the 500 kept the connection open, but the next request got nothing"
        assert status_of(second) == 200, second[:300]


def test_500s_log_one_traceback_then_one_line_each(server):
    """One traceback per error place at most once a minute, then one short line per error with a
    count: not two tracebacks (10.7 KB) per 60-byte request."""
    before = server.output()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(30):
            assert client.get("/_fault").status_code == 500
    time.sleep(0.5)  # let the last lines reach the log file
    output = server.output()
    added = output[len(before) :]
    assert output.count("Traceback") == 1, added[:3000]  # the first 500 (the test above) logged it
    assert added.count("unexpected error on GET /_fault") == 30, added[:3000]
    assert "(repeat 30;" in added, added[-1000:]
    assert len(added) < 30 * 300, len(added)


def test_500s_from_several_clients_leave_the_server_up(server):
    statuses: list[int] = []

    def fail_repeatedly() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            statuses.extend(client.get("/_fault").status_code for _ in range(10))

    threads = [threading.Thread(target=fail_repeatedly) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [500] * 40
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    assert server.output().count("Traceback") == 1
