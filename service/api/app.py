"""The FastAPI application: routers, middleware, error handlers, static page, lifespan.

app = create_app(settings, resources)   # what `convirt serve` runs (resources loaded first)
uvicorn --factory service.api.app:create_app  # loads the model and index during startup
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from convirt import __version__
from service.guard.access import Access, IdentifyBeforeBody
from service.guard.audit import AuditLog
from service.guard.limits import BodyReadDeadline, BodySizeLimit
from service.metrics import Metrics, RequestMetrics
from service.model.loading import Resources, load_resources
from service.search.kept import KeptUploads
from service.settings import Settings
from service.state import ServiceState

from .docs import fastapi_docs_url, install_local_docs
from .errors import install_error_handlers
from .hosts import HostCheck, allowed_hosts
from .routes import (
    admin,
    auth,
    explain,
    facets,
    health,
    image_reports,
    images,
    page,
    reports,
    scores,
    search,
    uploads,
)
from .routes.page import STATIC_DIR

DESCRIPTION = """Medical image-text retrieval with a ConVIRT model.

* **search**: a report sentence in, matching images out; an image (or a region of it) in, similar
  cases out; refine by example; the filterable fields (facets); why an image matched (explain).
  Results come one card per study where the metadata names studies (`group_by`).
* **images**: the indexed files and thumbnails by id, and similar cases of an indexed image.
* **admin**: switch to the newest index version (the admin role).
* **auth**: who you are. Every search and image needs the reader role: an API key in X-API-Key
  (use "Authorize"), or sign-in through the hospital's proxy; the service may also run open on
  loopback. Health, readiness and metrics need nothing.

Errors are JSON: `{"error": {"status", "code", "message", "details"}}`. Ids are 63-bit integers
sent as decimal strings.
"""


def create_app(settings: Settings | None = None, resources: Resources | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    service = ServiceState(settings, metrics)
    if resources is not None:
        service.attach(resources)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not service.ready:
            loaded = await run_in_threadpool(load_resources, settings)
            await run_in_threadpool(service.attach, loaded)
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="ConVIRT retrieval",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=fastapi_docs_url(),
        redoc_url=None,
    )
    app.state.service = service
    app.state.access = Access(settings)
    app.state.kept_uploads = KeptUploads(  # uploads kept for their uploader (upload_id)
        settings.upload_ttl_s, settings.upload_keep, settings.upload_keep_bytes
    )
    app.state.audit = (
        AuditLog.from_settings(settings, metrics.audit_event) if settings.audit_log else None
    )
    if app.state.audit is not None:
        metrics.audit_free_bytes.set_function(app.state.audit.free_bytes)
    install_error_handlers(app)  # its middleware innermost: 500s pass the metrics below
    app.add_middleware(IdentifyBeforeBody, access=app.state.access)
    app.add_middleware(
        BodySizeLimit,
        upload_limit=settings.max_upload_bytes,
        other_limit=settings.max_json_bytes,
    )
    app.add_middleware(BodyReadDeadline, seconds=settings.body_timeout)
    app.add_middleware(HostCheck, allowed=allowed_hosts(settings.allowed_hosts, settings.host))
    # outermost, so it counts the 413s of the size limit and the 400s of the host check too
    app.add_middleware(RequestMetrics, metrics=metrics, routes=app.router.routes)
    routers = (
        search,
        reports,
        facets,
        scores,
        explain,
        images,
        image_reports,
        uploads,
        admin,
        auth,
        health,
        page,
    )
    for module in routers:
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_local_docs(app)
    if settings.fault_route:
        install_fault_route(app)
    return app


class DeliberateFault(RuntimeError):
    pass


def install_fault_route(app: FastAPI) -> None:
    """GET /_fault: a 500 on purpose (CONVIRT_FAULT_ROUTE=1, tests only; not in the OpenAPI)."""

    @app.get("/_fault", include_in_schema=False)
    async def fault() -> None:
        raise DeliberateFault("a deliberate unexpected error (CONVIRT_FAULT_ROUTE is on)")
