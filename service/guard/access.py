"""Who is asking, and may they: API keys with roles, a trusted proxy's user header, rate limits
(the bucket: rate_limit.py; the peer and the proxies believed: peers.py; startup.py: the settings
`convirt serve` refuses).

Three modes (CONVIRT_AUTH):

- keys: every data endpoint needs an X-API-Key, a key of CONVIRT_AUTH_DB (`convirt keys add`,
  role reader or admin) or CONVIRT_API_KEY, which is an admin key. Revoking a key in the database
  takes effect within KEY_CACHE_SECONDS, without a restart.
- proxy: an authenticating reverse proxy (oauth2-proxy, any OIDC front) signs users in and sets
  CONVIRT_PROXY_USER_HEADER and CONVIRT_PROXY_GROUPS_HEADER; the service believes those headers
  only on connections from CONVIRT_FORWARDED_ALLOW_IPS, and maps the groups to roles. Keys work
  too (scripts, the admin API), as in keys mode.
- open: nobody signs in, every data endpoint answers anyone; the admin API still needs
  CONVIRT_API_KEY. `convirt serve` refuses to run open off loopback unless --insecure-no-auth.

auto (the default) is keys when CONVIRT_AUTH_DB is set, else open.

Every identified caller (a key or a proxy user) has a token bucket: CONVIRT_RATE_LIMIT_PER_MINUTE
requests a minute, CONVIRT_RATE_LIMIT_BURST at once; past it a 429 with Retry-After. Work that
takes the model far longer than a query costs more (Access.charge): a computed heat-map counts as
CONVIRT_EXPLAIN_RATE_COST requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import ApiError, error_response
from service.settings import Settings

from .keys import ROLES, UNKNOWN, KeyRecord, KeyRegistry, matches, split_key
from .peers import PEER, AddressList, is_loopback
from .rate_limit import RateLimiter

log = logging.getLogger("service")

API_KEY_HEADER = "X-API-Key"
KEY_CACHE_SECONDS = 1.0  # the key table is read again after this long: revocation delay
MAX_USER_CHARS = 256
ENV_KEY_ID = "env"  # the id CONVIRT_API_KEY appears under in the audit log


@dataclass(frozen=True)
class Principal:
    """An identified caller. user: "key:<id>", "proxy:<name>" or "anonymous"."""

    user: str
    name: str | None
    role: str | None  # reader, admin, or None: signed in through the proxy but in no role group
    identified: bool = True  # False: open mode, nobody signed in

    def can(self, role: str) -> bool:
        return self.role is not None and ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS = Principal("anonymous", None, "reader", identified=False)
ENV_ADMIN = Principal(f"key:{ENV_KEY_ID}", "CONVIRT_API_KEY", "admin")


def effective_mode(settings: Settings) -> str:
    """keys, proxy or open."""
    if settings.auth == "auto":
        return "keys" if settings.auth_db is not None else "open"
    return settings.auth


class IdentifyBeforeBody:
    """ASGI middleware: a request with a body (a query, an upload) and no valid identity gets
    its 401 before the body is read.

    FastAPI reads a request's body before it runs the route's dependencies, so without this the
    server would take in up to its body limit (an upload's 20 MB) from anyone before the key
    check said no. Only who is asking is checked here (Access.principal, as the route's
    dependency will); roles, rate limits and the audit stay with the route. Open mode, and
    requests outside /v1/ or without a body, pass through."""

    BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app: ASGIApp, access: Access):
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.access.mode != "open"
            and scope["type"] == "http"
            and scope["method"] in self.BODY_METHODS
            and scope["path"].startswith("/v1/")
        ):
            request = Request(scope)
            try:
                await self.access.principal(request, request.headers.get(API_KEY_HEADER))
            except ApiError as refused:
                response = error_response(
                    refused.status_code,
                    refused.code,
                    refused.message,
                    refused.details,
                    refused.headers,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def unauthorized(code: str, message: str) -> ApiError:
    return ApiError(
        401, code, message, headers={"WWW-Authenticate": f"APIKey header={API_KEY_HEADER}"}
    )


class Access:
    """Identifies callers (mode, keys, proxy headers) and rate-limits them; one per app."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.mode = effective_mode(settings)
        self.keys = KeyRegistry(settings.auth_db) if settings.auth_db is not None else None
        self.admin_key = settings.api_key.get_secret_value() if settings.api_key else None
        self.proxies = AddressList(settings.forwarded_allow_ips)
        self.admin_groups = names(settings.proxy_admin_groups)
        self.reader_groups = names(settings.proxy_reader_groups)
        per_minute = settings.rate_limit_per_minute
        self.limiter = (
            RateLimiter(per_minute, settings.rate_limit_burst) if per_minute > 0 else None
        )
        self.table: dict[str, KeyRecord] = {}
        self.table_read: tuple[float, tuple[int, int, int] | None] = (-math.inf, None)
        self.table_lock = asyncio.Lock()
        self.loopback = is_loopback(settings.host)

    async def identify(self, request: Request, key: str | None) -> Principal:
        """The caller, rate-limited: 401 without a valid identity (open mode: anonymous)."""
        principal = await self.principal(request, key)
        if principal.identified and self.limiter is not None:
            wait = self.limiter.take(principal.user)
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"too many requests from {principal.name or principal.user}: at most "
                    f"{self.settings.rate_limit_per_minute:g} a minute; retry in {seconds} s",
                    {"retry_after_seconds": seconds},
                    headers={"Retry-After": str(seconds)},
                )
        return principal

    def charge(self, principal: Principal, extra: float, what: str) -> None:
        """Spend `extra` requests more of the caller's rate limit, besides the one its request
        took, on `what`: work that takes the model far longer than a query (a heat-map), so one
        key cannot buy many seconds of model time a second. 429 when the caller has not that
        much left. Anonymous callers (open mode) are not rate-limited: the work's own queue
        bounds them."""
        if extra <= 0 or not principal.identified or self.limiter is None:
            return
        wait = self.limiter.take(principal.user, extra)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            per_minute = self.settings.rate_limit_per_minute
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests from {principal.name or principal.user}: {what} counts as "
                f"{extra + 1:g} of the {per_minute:g} requests a minute; retry in {seconds} s",
                {"retry_after_seconds": seconds, "cost": extra + 1},
                headers={"Retry-After": str(seconds)},
            )

    async def optional(self, request: Request, key: str | None) -> Principal | None:
        """identify(), or None where nobody signed in and no key was sent (no 401)."""
        if self.mode == "open" or key:
            return await self.identify(request, key)
        if self.mode == "keys" or self.proxy_user(request) is None:
            return None
        return await self.identify(request, key)

    async def principal(self, request: Request, key: str | None) -> Principal:
        """Who is asking (401 when nobody valid), without rate-limiting: identify() does that."""
        if self.mode == "open":
            if key and self.is_admin_key(key):
                return ENV_ADMIN
            return ANONYMOUS
        if self.mode == "proxy":
            found = self.proxy_user(request)
            if found is not None:
                return found
        if not key:
            how = "send an API key"
            if self.mode == "proxy":
                how = "sign in through the proxy, or send an API key"
            raise unauthorized(
                "missing_key", f"authentication required: {how} in the {API_KEY_HEADER} header"
            )
        return await self.key_principal(key)

    def proxy_user(self, request: Request) -> Principal | None:
        """The user the proxy signed in, if the request came from the proxy and names one."""
        peer = request.scope.get(PEER)
        if peer is None and request.client is not None:
            peer = request.client.host  # not run by `convirt serve`: uvicorn's view of the client
        if peer not in self.proxies:
            return None
        user = (request.headers.get(self.settings.proxy_user_header) or "").strip()
        if not user or len(user) > MAX_USER_CHARS or not user.isprintable():
            return None
        groups = set(names(request.headers.get(self.settings.proxy_groups_header) or ""))
        role = None
        if groups & set(self.admin_groups):
            role = "admin"
        elif not self.reader_groups or groups & set(self.reader_groups):
            role = "reader"
        return Principal(f"proxy:{user}", user, role)

    def is_admin_key(self, key: str) -> bool:
        """Whether `key` is CONVIRT_API_KEY (compared in constant time)."""
        return self.admin_key is not None and secrets.compare_digest(
            key.encode(), self.admin_key.encode()
        )

    async def key_principal(self, key: str) -> Principal:
        if self.is_admin_key(key):
            return ENV_ADMIN
        parts = split_key(key)
        record = await self.lookup(parts[0]) if parts else None
        # the digest is compared whether the id exists or not: the time an answer takes says
        # nothing about which key ids exist
        if not matches(record or UNKNOWN, parts[1] if parts else key) or record is None:
            raise unauthorized("unknown_key", f"the {API_KEY_HEADER} sent is not a valid key")
        if record.revoked_at:
            raise unauthorized(
                "revoked_key", f"key {record.id} ({record.name}) was revoked at {record.revoked_at}"
            )
        if record.expired():
            raise unauthorized(
                "expired_key", f"key {record.id} ({record.name}) expired at {record.expires_at}"
            )
        return Principal(f"key:{record.id}", record.name, record.role)

    async def lookup(self, key_id: str) -> KeyRecord | None:
        """The key's row, from a copy of the whole table: a known id and an unknown one are both
        a dict look-up, with no database read an unknown id could trigger, or time. The copy is
        read again when the file changes (a key added or revoked counts at once) and at least
        every KEY_CACHE_SECONDS."""
        if self.keys is None:
            return None
        return (await self.key_table()).get(key_id)

    async def key_table(self) -> dict[str, KeyRecord]:
        assert self.keys is not None
        if not self.table_stale():
            return self.table
        async with self.table_lock:  # one read for the requests that find it stale together
            if self.table_stale():
                signature = self.table_signature()
                try:
                    records = await run_in_threadpool(self.keys.records)
                except Exception as err:  # sqlite3.Error, OSError: fail closed
                    log.error("the key database %s cannot be read: %s", self.keys.path, err)
                    raise ApiError(
                        503, "auth_unavailable", "the key database cannot be read"
                    ) from err
                self.table = {record.id: record for record in records}
                self.table_read = (time.monotonic(), signature)
        return self.table

    def table_signature(self) -> tuple[int, int, int] | None:
        assert self.keys is not None
        try:
            stat = self.keys.path.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def table_stale(self) -> bool:
        read_at, signature = self.table_read
        return (
            time.monotonic() - read_at >= KEY_CACHE_SECONDS
            or signature is None
            or signature != self.table_signature()
        )

    def describe(self, principal: Principal | None) -> dict[str, Any]:
        """What GET /v1/whoami answers."""
        note = None
        if self.mode == "open":
            note = (
                "open: no authentication, loopback only"
                if self.loopback
                else "open: no authentication (started with --insecure-no-auth)"
            )
        signed_in = principal is not None and principal.identified
        return {
            "mode": self.mode,
            "user": principal.name if signed_in else None,
            "role": principal.role if signed_in else None,
            "note": note,
        }


def names(text: str) -> list[str]:
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]
