"""GET /v1/images/{id}, /thumbnail and /similar: indexed images, addressed by id only.

Files are served only from the path the index recorded for an id; no request parameter is ever
used as a path, so nothing outside the index can be reached.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from convirt.imageio import looks_like_dicom
from index.store import IndexStore

from ..deps import EngineDep, ImageId, StoreDep, UrlRootDep
from ..errors import ApiError
from ..results import describe_hits
from ..schemas import K_DEFAULT, K_MAX, SearchResponse, errors
from .search import elapsed_ms

router = APIRouter(prefix="/v1/images", tags=["images"])

CACHE = {
    "Cache-Control": "public, max-age=86400"
}  # an id is a content hash: its bytes never change
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
        **errors(404, 422),
    },
    summary="The original image file",
)
async def image_file(image_id: ImageId, store: StoreDep) -> FileResponse:
    """The file as indexed (PNG, JPEG or DICOM). 404 when the id is unknown, or when the file
    was moved or changed since it was indexed (`convirt index verify` lists such files)."""
    row = await run_in_threadpool(known_row, store, image_id)
    path = await run_in_threadpool(indexed_file, row)
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
    "/{image_id}/similar",
    response_model=SearchResponse,
    responses=errors(404, 422),
    summary="Similar cases for an indexed image",
)
async def similar(
    image_id: ImageId,
    engine: EngineDep,
    store: StoreDep,
    root: UrlRootDep,
    k: Annotated[int, Query(ge=1, le=K_MAX, description="how many images to return")] = K_DEFAULT,
) -> SearchResponse:
    """The k indexed images nearest to this one in the encoder space, itself excluded."""
    started = time.perf_counter()
    try:
        results = await engine.search(
            lambda: describe_hits(store, store.similar_to_id(image_id, k), root)
        )
    except KeyError as err:
        raise unknown_id(store, image_id) from err
    return SearchResponse(
        results=results,
        took_ms=elapsed_ms(started),
        index_version=store.version,
        model_fingerprint=store.fingerprint,
    )


def unknown_id(store: IndexStore, image_id: int) -> ApiError:
    return ApiError(
        404, "unknown_id", f"no image with id {image_id} in index version {store.version}"
    )


def known_row(store: IndexStore, image_id: int) -> dict[str, Any]:
    row = store.get(image_id)
    if row is None:
        raise unknown_id(store, image_id)
    return row


def indexed_file(row: dict[str, Any]) -> Path:
    """The recorded path, if it still holds a regular file of the recorded size."""
    path = Path(row["path"])
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file() or stat.st_size != row["size_bytes"]:
        raise ApiError(
            404,
            "image_file_missing",
            f"image {row['id']} is indexed, but its file was moved or changed since; "
            "run `convirt index verify` and re-add it",
        )
    return path


def media_type(path: Path) -> str:
    known = MEDIA_TYPES.get(path.suffix.lower())
    if known:
        return known
    with open(path, "rb") as f:
        head = f.read(132)
    return "application/dicom" if looks_like_dicom(head) else "application/octet-stream"
