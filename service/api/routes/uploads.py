"""GET /v1/uploads/{upload_id}/pixels: a kept upload (service/search/kept.py) for the viewer, as an
indexed image's pixels are (routes/images.py). Only its uploader may read it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from fastapi.responses import Response

from ..deps import KeptUploadsDep, PrincipalDep, SearcherDep, kept_upload, reader_router
from ..queries import UPLOAD_ID, UPLOAD_ID_DOC
from ..responses import errors
from .images import pixel_response

router = reader_router("/v1/uploads", "images")


@router.get(
    "/{upload_id}/pixels",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **errors(404, 413, 422, 503)},
    summary="An upload's values for a viewer: 16-bit grey samples with its window",
)
async def upload_pixels(
    upload_id: Annotated[str, Path(pattern=UPLOAD_ID, description=UPLOAD_ID_DOC)],
    searcher: SearcherDep,
    principal: PrincipalDep,
    uploads: KeptUploadsDep,
) -> Response:
    """As GET /v1/images/{id}/pixels, of the upload; 404 `unknown_upload` when it is not kept
    (expired, evicted, or someone else's): upload the image again."""
    upload = kept_upload(uploads, principal, upload_id)
    return pixel_response(await searcher.pixels(upload.data))
