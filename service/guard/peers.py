"""Who connected: the TCP peer's address, kept before uvicorn's proxy-headers middleware replaces
it, and the address lists that say which proxies are believed (CONVIRT_FORWARDED_ALLOW_IPS)."""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

PEER = "convirt.peer"  # scope key: the address of the TCP peer, before X-Forwarded-For


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost: it may resolve anywhere


class AddressList:
    """Addresses and networks from a comma-separated setting ("10.0.0.5,10.1.0.0/16"); * is any."""

    def __init__(self, text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        self.empty = not items
        self.any = "*" in items
        self.networks = []
        self.names = set()
        for item in items:
            if item == "*":
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.names.add(item)  # e.g. a unix socket path, matched literally

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str) or not host:
            return False
        if self.any or host in self.names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


class RecordPeer:
    """ASGI middleware, outermost: keeps the TCP peer's address in the scope before uvicorn's
    proxy-headers middleware (inside it) replaces `client` with the X-Forwarded-For address, so
    that proxy mode can tell a request that came from the proxy from one that merely says so."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            scope[PEER] = client[0] if client else None
        await self.app(scope, receive, send)


def with_peer_and_proxy_headers(app: ASGIApp, forwarded_allow_ips: str) -> ASGIApp:
    """The app as `convirt serve` runs it: uvicorn's proxy-headers handling (run with
    proxy_headers=False), with the peer recorded before it. No trusted proxies (the default): no
    X-Forwarded-For is believed, from loopback either, so a local client cannot name the address
    the audit log records for it."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    if AddressList(forwarded_allow_ips).empty:
        return RecordPeer(app)
    return RecordPeer(ProxyHeadersMiddleware(app, trusted_hosts=forwarded_allow_ips))  # type: ignore[arg-type]
