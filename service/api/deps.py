"""FastAPI dependencies: the service state, its settings, the Searcher, a leased index store, the
kept uploads (service/search/kept.py), the caller (authenticate, require_reader, require_admin)
and the audit record of a request (audited).

All are `async def`: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per
dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.read.limits import ID_MAX
from index.read.store import IndexStore
from index.read.timings import AUDIT
from service.errors import ServiceError
from service.guard import audit
from service.guard.access import API_KEY_HEADER, Access, Principal, unauthorized
from service.guard.audit import AuditLog, AuditRecord
from service.search.kept import KeptUpload, KeptUploads
from service.search.searcher import Searcher
from service.settings import Settings
from service.state import ServiceState

from .errors import ApiError, status_of_error
from .responses import errors

log = logging.getLogger("service")

api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="APIKey",
    auto_error=False,
    description="an API key (`convirt keys add`; CONVIRT_API_KEY is an admin key). Not needed "
    "behind the authenticating proxy, or when the service runs open on loopback",
)


async def get_service(request: Request) -> ServiceState:
    return request.app.state.service


ServiceDep = Annotated[ServiceState, Depends(get_service)]


async def get_settings(service: ServiceDep) -> Settings:
    return service.settings


async def get_searcher(service: ServiceDep) -> Searcher:
    if service.searcher is None:
        raise ApiError(503, "not_ready", "the model and index are still loading; retry shortly")
    return service.searcher


async def leased_store(service: ServiceDep) -> AsyncIterator[IndexStore]:
    """The index version current when the request arrived, kept open until it is answered."""
    if service.stores is None:
        raise ApiError(503, "not_ready", "the index is still loading; retry shortly")
    with service.stores.lease() as store:
        yield store


async def get_access(request: Request) -> Access:
    return request.app.state.access


AccessDep = Annotated[Access, Depends(get_access)]
ApiKeyDep = Annotated[str | None, Security(api_key_header)]


async def authenticate(request: Request, access: AccessDep, key: ApiKeyDep) -> Principal:
    """The caller (401 without a valid key or proxy user, 429 past its rate); once a request."""
    return await access.identify(request, key)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require(role: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that lets through callers with `role` or a higher one (403 role_too_low)."""

    async def check(principal: PrincipalDep, access: AccessDep) -> Principal:
        if principal.can(role):
            return principal
        if access.mode == "open":  # as before keys existed: CONVIRT_API_KEY guards the admin API
            if access.admin_key is None:
                raise ApiError(
                    403,
                    "admin_disabled",
                    "the admin API is off: start the service with CONVIRT_API_KEY",
                )
            raise unauthorized(
                "unauthorized", f"missing or wrong API key: send it in the {API_KEY_HEADER} header"
            )
        who = principal.name or principal.user
        raise ApiError(
            403,
            "role_too_low",
            f"this needs the {role} role; {who} has {principal.role or 'no role'}",
            {"needed": role, "role": principal.role},
        )

    check.__name__ = f"require_{role}"
    return check


require_reader = require("reader")
require_admin = require("admin")


async def audited(request: Request, principal: PrincipalDep) -> AsyncIterator[None]:
    """The request's audit record (service.guard.audit): opened here, filled in by the route, written
    when the handler is done (function scope: before the response goes out, so a request whose
    entry cannot be written gets a 503 instead of its answer)."""
    trail: AuditLog | None = request.app.state.audit
    if trail is None:
        yield
        return
    route = request.scope.get("route")
    record = AuditRecord(
        principal.user,
        principal.name,
        principal.role,
        request.client.host if request.client else None,
        request.method,
        getattr(route, "path", None) or request.url.path,
    )
    image_id = str(request.path_params.get("image_id", ""))
    if image_id.isdigit() and len(image_id) <= 20:
        record.images.append(image_id)
    token = audit.begin(record)
    failure: BaseException | None = None
    try:
        yield
    except BaseException as err:
        failure = err
        record.status = status_of(err)
        raise
    finally:
        audit.end(token)
        started = time.perf_counter()
        await write_record(trail, record, failure)
        metrics = request.app.state.service.metrics
        metrics.stages.labels(AUDIT).observe(time.perf_counter() - started)


def status_of(err: BaseException) -> int:
    if isinstance(err, StarletteHTTPException):
        return err.status_code
    if isinstance(err, ServiceError):
        return status_of_error(err)
    return 422 if isinstance(err, RequestValidationError) else 500


async def write_record(trail: AuditLog, record: AuditRecord, failure: BaseException | None) -> None:
    try:
        if failure is None or isinstance(failure, Exception):
            await run_in_threadpool(trail.write, record)
        else:
            trail.write(record)  # cancelled: nothing more may be awaited
    except Exception as err:
        log.error("audit entry of %s %s not written: %s", record.method, record.endpoint, err)
        if failure is None:
            raise ApiError(
                503,
                "audit_unavailable",
                getattr(err, "public", audit.AuditError.public),
            ) from err


READER = Depends(require_reader)
ADMIN = Depends(require_admin)
AUDITED = Depends(audited, scope="function")


def reader_router(prefix: str, tag: str) -> APIRouter:
    """A router of the reader API: every route audited, the reader role required (401, 403, 429)."""
    return APIRouter(
        prefix=prefix, tags=[tag], dependencies=[AUDITED, READER], responses=errors(401, 403, 429)
    )


async def url_root(request: Request) -> str:
    """Prefix of the URLs put in responses (non-empty when served under a proxy's root_path)."""
    return request.scope.get("root_path", "").rstrip("/")


async def get_kept_uploads(request: Request) -> KeptUploads:
    return request.app.state.kept_uploads


KeptUploadsDep = Annotated[KeptUploads, Depends(get_kept_uploads)]


def kept_upload(uploads: KeptUploads, principal: Principal, upload_id: str) -> KeptUpload:
    """The caller's kept upload (404 unknown_upload otherwise), noted in the request's audit
    record as an upload is (its hash: the same as when it was sent)."""
    upload = uploads.get(principal.user, upload_id)
    audit.note_upload(upload.data)
    return upload


SettingsDep = Annotated[Settings, Depends(get_settings)]
SearcherDep = Annotated[Searcher, Depends(get_searcher)]
StoreDep = Annotated[IndexStore, Depends(leased_store)]
UrlRootDep = Annotated[str, Depends(url_root)]
ImageId = Annotated[
    int, Path(ge=0, le=ID_MAX, description="image id, from a search result", examples=[12345])
]
