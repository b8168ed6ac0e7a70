"""GET /v1/images/{id}, /thumbnail and /similar: indexed images, addressed by id only.

Files are served only from the path the index recorded for an id; no request parameter is ever
used as a path, so nothing outside the index can be reached.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from convirt.imageio import looks_like_dicom
from convirt.viewpixels import ViewPixels
from index.read.store import IndexStore
from service.guard import audit

from ..deps import AUDITED, READER, ImageId, SearcherDep, ServiceDep, StoreDep, UrlRootDep
from ..errors import ApiError
from ..query_params import BoxQuery, SearchQuery
from ..responses import SearchResponse, errors
from ..results import response_fields
from ..uploads import parse_box

# Thumbnails are not audited: each one the page shows is of a result id its search recorded.
router = APIRouter(
    prefix="/v1/images", tags=["images"], dependencies=[READER], responses=errors(401, 403, 429)
)

# An id is a content hash: its bytes never change. Private: patients' images are for the browser
# that was let in, never for a shared cache on the way.
CACHE = {"Cache-Control": "private, max-age=86400"}
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".dcm": "application/dicom",
    ".dicom": "application/dicom",
}


@router.get(
    "/{image_id}",
    response_class=FileResponse,
    responses={
        200: {"content": {t: {} for t in sorted(set(MEDIA_TYPES.values()))}},
        **errors(404, 422, 503, 504),
    },
    summary="The original image file",
    dependencies=[AUDITED],
)
async def image_file(image_id: ImageId, store: StoreDep, service: ServiceDep) -> FileResponse:
    """The file as indexed (PNG, JPEG or DICOM). 404 when the id is unknown, or when the file
    was moved or changed since it was indexed (`convirt index verify` lists such files).

    An image a PACS holds is fetched from it once (then served from a local copy), in a pool of
    its own under a deadline: 504 `pacs_timeout` when the PACS is too slow, 503 `pacs_busy` or
    `pacs_unavailable` (with Retry-After) when its fetches are all taken or it just failed."""
    row = await run_in_threadpool(known_row, store, image_id)
    path = await service.pacs.file(row)
    return FileResponse(
        path,
        media_type=await run_in_threadpool(media_type, path),
        filename=Path(row["relpath"]).name,
        content_disposition_type="inline",
        headers=CACHE,
    )


@router.get(
    "/{image_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **errors(404, 422)},
    summary="The JPEG thumbnail (longest side 128 px)",
)
async def thumbnail(image_id: ImageId, store: StoreDep) -> Response:
    data = await run_in_threadpool(store.thumbnail, image_id)
    if data is None:
        raise unknown_id(store, image_id)
    return Response(data, media_type="image/jpeg", headers=CACHE)


@router.get(
    "/{image_id}/pixels",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        **errors(404, 413, 422, 503, 504),
    },
    summary="The image's values for a viewer: 16-bit grey samples with its window",
    dependencies=[AUDITED],
)
async def pixels(image_id: ImageId, searcher: SearcherDep) -> Response:
    """Little-endian uint16 samples, row-major, X-Height rows of X-Width, the longest side at
    most 2048 (area-downsampled from X-Original-Width x X-Original-Height). A DICOM image keeps
    its values after the modality transform (value = X-Rescale-Intercept + X-Rescale-Slope *
    sample: CT in Hounsfield units) and its own window (X-Window-Center, X-Window-Width, in
    samples); other images are 8-bit grey (colour made grey) with their full range as the
    window. X-Value-Min and X-Value-Max: the smallest and largest sample. X-Value-Unit: what
    the values are, where known ("HU": a CT, or a Rescale Type of HU). Decoded in the decode
    pool, under CONVIRT_MAX_CONCURRENT_DECODES (convirt/viewpixels.py)."""
    return pixel_response(await searcher.pixels(image_id))


def pixel_response(view: ViewPixels) -> Response:
    """The samples with the headers that say how to read them (see `pixels`)."""
    headers = {
        "X-Width": str(view.width),
        "X-Height": str(view.height),
        "X-Original-Width": str(view.original_width),
        "X-Original-Height": str(view.original_height),
        "X-Window-Center": number(view.window_center),
        "X-Window-Width": number(view.window_width),
        "X-Value-Min": str(view.value_min),
        "X-Value-Max": str(view.value_max),
        "X-Rescale-Slope": number(view.slope),
        "X-Rescale-Intercept": number(view.intercept),
        "X-Colour-Made-Grey": "1" if view.colour else "0",
        **({"X-Value-Unit": view.unit} if view.unit else {}),
        **CACHE,
    }
    return Response(view.samples, media_type="application/octet-stream", headers=headers)


def number(value: float) -> str:
    """A header's number: 1031.5, 40, -1024 (no trailing .0)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@router.get(
    "/{image_id}/similar",
    responses=errors(404, 413, 422, 503, 504),
    summary="Similar cases for an indexed image, or a region of it",
    dependencies=[AUDITED],
)
async def similar(
    image_id: ImageId,
    searcher: SearcherDep,
    root: UrlRootDep,
    options: SearchQuery,
    box: BoxQuery = None,
) -> SearchResponse:
    """The k indexed images nearest to this one in the encoder space, itself excluded; with a
    `box`, the images nearest to that region of its file."""
    started = time.perf_counter()
    region = parse_box(box)
    audit.note_image(image_id)
    found = await searcher.similar(image_id, options, region)
    audit.note_results(found.results)
    return SearchResponse(**response_fields(found, started, root))


def unknown_id(store: IndexStore, image_id: int) -> ApiError:
    return ApiError(
        404, "unknown_id", f"no image with id {image_id} in index version {store.version}"
    )


def known_row(store: IndexStore, image_id: int) -> dict[str, Any]:
    row = store.get(image_id)
    if row is None:
        raise unknown_id(store, image_id)
    return row


def media_type(path: Path) -> str:
    known = MEDIA_TYPES.get(path.suffix.lower())
    if known:
        return known
    with open(path, "rb") as f:
        head = f.read(132)
    return "application/dicom" if looks_like_dicom(head) else "application/octet-stream"
