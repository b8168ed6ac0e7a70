"""POST /v1/admin/reload: switch to the newest index version (the admin role required)."""

from __future__ import annotations

from fastapi import APIRouter

from index.errors import CorruptVersionError, IndexStoreError, ModelMismatchError

from ..deps import ADMIN, AUDITED, ServiceDep
from ..errors import ApiError
from ..responses import ReloadResponse, errors

router = APIRouter(
    prefix="/v1/admin", tags=["admin"], dependencies=[AUDITED, ADMIN], responses=errors(429)
)


@router.post(
    "/reload",
    responses=errors(401, 403, 409, 503),
    summary="Serve the newest index version",
)
async def reload_index(service: ServiceDep) -> ReloadResponse:
    """Open the version the index root's CURRENT names and serve it from now on. Requests already
    running finish on the version they started with; none is dropped. A version built with
    another model is refused (409), and so is a damaged one (503: files that do not load, fail
    SQLite's quick_check or disagree on the image count); the current one keeps serving."""
    if not service.ready:
        raise ApiError(503, "not_ready", "the service is still loading; retry shortly")
    try:
        outcome = await service.reload()
    except ModelMismatchError as err:
        raise ApiError(409, "model_mismatch", str(err)) from err
    except CorruptVersionError as err:
        raise ApiError(503, "index_damaged", str(err), {"problems": err.problems}) from err
    except IndexStoreError as err:
        raise ApiError(503, "index_unavailable", str(err)) from err
    return ReloadResponse(
        reloaded=outcome.reloaded,
        previous_version=outcome.previous_version,
        index_version=outcome.version,
        images=outcome.images,
        took_ms=round(outcome.seconds * 1000, 3),
    )
