"""GET /healthz (the process answers), /readyz (model and index loaded), /metrics (Prometheus).

/readyz also says how the PACS behind PACS-indexed images is doing (a `pacs` section, from the
outcomes of the last fetches: service.search.pacs). An unreachable or slow PACS leaves /readyz at 200
with `pacs.status` "degraded", by choice: readiness decides whether a load balancer sends this
replica traffic, and every replica shares the one PACS, so taking them out would stop text and
image search (answered from the local index) and gain nothing; the viewers of PACS images get a
prompt 504/503 meanwhile. Alert on `pacs.status` or on convirt_pacs_fetches{outcome="timeout"}.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..deps import ServiceDep
from ..responses import Health, PacsReadiness, Readiness

router = APIRouter(tags=["operations"])


class ReadinessWithPacs(Readiness):
    pacs: PacsReadiness | None = None


@router.get("/healthz", summary="Liveness probe")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=ReadinessWithPacs,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "still loading"}},
    summary="Readiness probe: the model and an index version are loaded",
)
async def readyz(service: ServiceDep) -> ReadinessWithPacs | JSONResponse:
    """200 once the model and an index version are loaded (503 before). `pacs` (where the index
    holds PACS images, or one was fetched): "degraded" when the PACS failed its last fetch. That
    stays a 200: searches are answered from the local index whatever the PACS does."""
    if not service.ready or service.engine is None or service.stores is None:
        return JSONResponse(Readiness(status="loading").model_dump(), status_code=503)
    store = service.stores.current
    known = list((store.info.get("dicomweb") or {}).keys())
    pacs = service.pacs.readiness(known)
    return ReadinessWithPacs(
        status="ready",
        index_version=store.version,
        model_fingerprint=service.engine.fingerprint,
        images=store.count,
        query_encoder=service.engine.query_encoder,
        pacs=PacsReadiness(**asdict(pacs)) if pacs.status != "unused" else None,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
    summary="Prometheus metrics",
)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)
