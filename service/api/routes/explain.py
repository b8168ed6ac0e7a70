"""GET /v1/explain: why an image matched a query, as a heat-map over the image."""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated

from fastapi import Query, Response

from index.read.limits import ID_MAX
from service.guard import audit

from ..deps import (
    AccessDep,
    KeptUploadsDep,
    PrincipalDep,
    SearcherDep,
    SettingsDep,
    kept_upload,
    reader_router,
)
from ..errors import ApiError
from ..queries import UPLOAD_ID, UPLOAD_ID_DOC
from ..responses import CropBox, ExplainResponse, errors
from ..results import elapsed_ms

router = reader_router("/v1", "search")
CACHE_HEADER = "X-Explain-Cache"  # hit: the map came from the cache; miss: computed for this


@router.get(
    "/explain",
    responses=errors(404, 422, 503),
    summary="Where in an image its match to a query comes from",
)
async def explain(
    searcher: SearcherDep,
    principal: PrincipalDep,
    access: AccessDep,
    settings: SettingsDep,
    uploads: KeptUploadsDep,
    response: Response,
    image_id: Annotated[int, Query(ge=0, le=ID_MAX, description="the result to explain")],
    text: Annotated[
        str | None, Query(max_length=2000, description="the text query it matched")
    ] = None,
    query_id: Annotated[
        int | None,
        Query(ge=0, le=ID_MAX, description="or the indexed image it was found similar to"),
    ] = None,
    upload_id: Annotated[
        str | None, Query(pattern=UPLOAD_ID, description=f"or the upload: {UPLOAD_ID_DOC}")
    ] = None,
) -> ExplainResponse:
    """Occlusion sensitivity: a patch slides over the image, every occluded copy is embedded in
    one batch, and each cell holds how much the similarity to the query drops while it is hidden.
    High cells are what the match rests on. The grid covers `crop`, the centre square the encoder
    sees. It takes about a second of a CPU core, in a worker of its own (never the thread text
    and image queries wait for); one computed map counts as CONVIRT_EXPLAIN_RATE_COST requests
    of the caller's rate limit, and when CONVIRT_EXPLAIN_QUEUE maps already wait the answer is a
    503 `explain_busy` with Retry-After. The last maps are cached by (index version, image,
    query): the `X-Explain-Cache` header says `hit` or `miss`. With `upload_id` (an upload kept
    by POST /v1/search/image) the map is of the result's similarity to the upload (encoder
    space), as with `query_id`."""
    started = time.perf_counter()
    charge = partial(access.charge, principal, settings.explain_rate_cost - 1, "a heat-map")
    given = [part for part in (text, query_id, upload_id) if part is not None]
    if len(given) != 1:
        raise ApiError(422, "invalid_query", "give one of text, query_id or upload_id")
    audit.note_image(image_id)
    audit.note_query(text)
    audit.note_image(query_id)
    query = given[0] if upload_id is None else kept_upload(uploads, principal, upload_id)
    found, cached = await searcher.explain(image_id, query, charge)
    response.headers[CACHE_HEADER] = "hit" if cached else "miss"
    heat_map = found.heat_map
    left, top, width, height = heat_map.crop
    return ExplainResponse(
        image_id=str(image_id),
        space=found.space,
        score=round(heat_map.score, 6),
        grid=[[round(float(v), 6) for v in row] for row in heat_map.grid],
        crop=CropBox(left=left, top=top, width=width, height=height),
        took_ms=elapsed_ms(started),
        index_version=found.index_version,
    )
