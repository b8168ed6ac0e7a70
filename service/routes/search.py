"""POST /v1/search/text and /v1/search/image: a report sentence or an image in, images out."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import torch
from fastapi import APIRouter, File, Form, UploadFile

from convirt.imageio import ImageDecodeError, ImageTooLargeError
from index.store import IndexStore

from ..deps import EngineDep, SettingsDep, StoreDep, UrlRootDep
from ..engine import Engine
from ..errors import ApiError
from ..results import describe_hits
from ..schemas import (
    K_DEFAULT,
    K_MAX,
    MAX_FILTER_KEY_CHARS,
    MAX_FILTER_VALUE_CHARS,
    MAX_FILTERS,
    SearchResponse,
    SearchResult,
    TextQuery,
    TextSearchResponse,
    check_filters,
    errors,
)
from ..uploads import image_bytes

router = APIRouter(prefix="/v1/search", tags=["search"])


@router.post(
    "/text",
    response_model=TextSearchResponse,
    responses=errors(413, 422, 503),
    summary="Images matching a report sentence",
)
async def search_text(
    query: TextQuery,
    engine: EngineDep,
    store: StoreDep,
    settings: SettingsDep,
    root: UrlRootDep,
) -> TextSearchResponse:
    """Embed the sentence with the text encoder (micro-batched with concurrent queries) and return
    the k nearest images in the joint space. A sentence past the encoder's token limit is cut to
    its start, and `truncated` says so."""
    started = time.perf_counter()
    if len(query.text) > settings.max_text_chars:
        raise ApiError(
            422,
            "text_too_long",
            f"text has {len(query.text):,} characters; the limit is {settings.max_text_chars:,} "
            f"(and the encoder reads only its first {engine.max_tokens} tokens)",
        )
    embedded = await engine.embed_text(query.text)
    results = await run_search(
        engine, store, root, store.search_text_vectors, embedded.vector, query.k, query.filters
    )
    return TextSearchResponse(
        results=results,
        took_ms=elapsed_ms(started),
        index_version=store.version,
        model_fingerprint=store.fingerprint,
        truncated=embedded.truncated,
        max_tokens=engine.max_tokens,
    )


@router.post(
    "/image",
    response_model=SearchResponse,
    responses=errors(413, 415, 422, 503),
    summary="Similar cases for an uploaded image",
)
async def search_image(
    file: Annotated[UploadFile, File(description="a PNG, JPEG or DICOM file")],
    engine: EngineDep,
    store: StoreDep,
    root: UrlRootDep,
    k: Annotated[int, Form(ge=1, le=K_MAX, description="how many images to return")] = K_DEFAULT,
    filters: Annotated[
        str | None, Form(description='equality filters as a JSON object, e.g. {"modality": "CT"}')
    ] = None,
) -> SearchResponse:
    """Decode the upload, embed it with the image encoder and return the k nearest indexed images
    in the encoder space (the space the index stores for image-to-image search)."""
    started = time.perf_counter()
    wanted = parse_filters(filters)
    data = image_bytes(await file.read(), file.filename, file.content_type)
    pixels = await decode(engine, data)
    vector = await engine.embed_image(pixels)
    results = await run_search(engine, store, root, store.search_image_vectors, vector, k, wanted)
    return SearchResponse(
        results=results,
        took_ms=elapsed_ms(started),
        index_version=store.version,
        model_fingerprint=store.fingerprint,
    )


async def decode(engine: Engine, data: bytes) -> torch.Tensor:
    try:
        return await engine.prepare_image(data)
    except ImageTooLargeError as err:
        raise ApiError(413, "too_many_pixels", str(err)) from err
    except ImageDecodeError as err:
        raise ApiError(422, "undecodable_image", str(err)) from err


def parse_filters(text: str | None) -> dict[str, Any]:
    """The form field `filters` (JSON text) checked as a JSON body's filters are."""
    if not text:
        return {}
    if len(text) > MAX_FILTERS_JSON_CHARS:  # before parsing: nesting 10,000 deep is short text
        raise ApiError(
            422, "invalid_filters", f"filters is longer than {MAX_FILTERS_JSON_CHARS} characters"
        )
    try:
        filters = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ApiError(422, "invalid_filters", f"filters is not valid JSON: {err}") from err
    if not isinstance(filters, dict):  # the values are checked by check_filters
        raise ApiError(
            422, "invalid_filters", "filters must be a JSON object of field: value (no nesting)"
        )
    try:
        return check_filters(filters)
    except ValueError as err:
        raise ApiError(422, "invalid_filters", str(err)) from err


async def run_search(
    engine: Engine,
    store: IndexStore,
    root: str,
    search,
    vector,
    k: int,
    filters: dict[str, Any],
) -> list[SearchResult]:
    """Search in the engine's search pool; an unusable filter field is the client's error (422)."""
    try:
        return await engine.search(
            lambda: describe_hits(store, search(vector, k, filters)[0], root)
        )
    except ValueError as err:
        if not filters:
            raise
        raise ApiError(422, "invalid_filters", str(err)) from err


# Room for MAX_FILTERS fields of the longest names and values, and no more.
MAX_FILTERS_JSON_CHARS = MAX_FILTERS * (MAX_FILTER_KEY_CHARS + MAX_FILTER_VALUE_CHARS + 8)


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
