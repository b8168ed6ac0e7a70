"""GET /healthz (the process answers), /readyz (model and index loaded), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..deps import ServiceDep
from ..schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness probe")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "still loading"}},
    summary="Readiness probe: the model and an index version are loaded",
)
async def readyz(service: ServiceDep) -> Readiness | JSONResponse:
    if not service.ready or service.engine is None or service.stores is None:
        return JSONResponse(Readiness(status="loading").model_dump(), status_code=503)
    store = service.stores.current
    return Readiness(
        status="ready",
        index_version=store.version,
        model_fingerprint=service.engine.fingerprint,
        images=store.count,
        query_encoder=service.engine.query_encoder,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
    summary="Prometheus metrics",
)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)
