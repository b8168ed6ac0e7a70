"""Which Host headers the service answers (CONVIRT_ALLOWED_HOSTS): a defence against DNS rebinding.

A web page the user visits can point its own name at 127.0.0.1 once loaded (DNS rebinding) and
then read a service on loopback as if it were its own origin: the browser sends `Host:
evil.example.com`, and a server that answers any host hands the page the archive. So by default
(`auto`) only the names a user really types reach the service: the address it is bound to, the
localhost names, and, when bound to every interface (0.0.0.0, ::), this machine's own name and
addresses (what a container's health check or a Kubernetes probe sends). Everything else gets a
JSON 400 that says which setting to change. `auto` may be combined with more names
("auto,search.example.org"); `*` serves any host.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

AUTO = "auto"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def allowed_hosts(setting: str, bound: str) -> list[str]:
    """The host names a request may name, lower case, from the setting and the bound address."""
    names: list[str] = []
    for item in (part.strip().lower() for part in setting.split(",")):
        if item == AUTO:
            names.extend(automatic_hosts(bound))
        elif item:
            names.append(item.strip("[]"))
    return list(dict.fromkeys(names)) or automatic_hosts(bound)


def automatic_hosts(bound: str) -> list[str]:
    """The bound address and the localhost names; on a wildcard address, this machine's too."""
    bound = bound.strip().strip("[]").lower()
    names = [*LOCAL_NAMES]
    if bound not in WILDCARDS:
        return [*names, bound]
    host = socket.gethostname()
    names += [host.lower(), socket.getfqdn().lower()]
    names += _addresses_of(host)
    return names


def _addresses_of(host: str) -> list[str]:
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [str(info[4][0]).split("%")[0] for info in found]


def host_of(header: str) -> str:
    """The host name of a Host header, without its port or an IPv6 address's brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    try:
        ipaddress.IPv6Address(header)
        return header  # a bare IPv6 address: its colons are not a port
    except ValueError:
        return header.rpartition(":")[0] if ":" in header else header


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    for pattern in allowed:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class HostCheck:
    """ASGI middleware: a request whose Host is not allowed gets a JSON 400 naming the setting."""

    def __init__(self, app: ASGIApp, allowed: list[str]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = host_of(Headers(scope=scope).get("host", ""))
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        response = error_response(
            400,
            "host_not_allowed",
            f"this service does not answer for the host {host or '(none)'!r}: it serves "
            f"{', '.join(self.allowed)}. If that is this service's own name, add it to "
            "CONVIRT_ALLOWED_HOSTS (e.g. auto,search.example.org)",
        )
        await response(scope, receive, send)
