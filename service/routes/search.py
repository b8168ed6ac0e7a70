"""POST /v1/search/text, /image and /refine: a sentence, an image (or a region) or feedback in,
images out. Each route hands its query to the Searcher and packs its answer."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from ..deps import AUDITED, READER, SearcherDep, UrlRootDep
from ..query_params import form_options, response_fields
from ..schemas import (
    FILTERS_DOC,
    GROUP_BY,
    K_DEFAULT,
    K_MAX,
    KEYWORDS_DOC,
    GroupBy,
    RefineQuery,
    SearchResponse,
    TextQuery,
    TextSearchResponse,
    errors,
)
from ..searcher import SearchOptions
from ..uploads import image_bytes, parse_box

router = APIRouter(
    prefix="/v1/search",
    tags=["search"],
    dependencies=[AUDITED, READER],
    responses=errors(401, 403, 429),
)


@router.post(
    "/text",
    response_model=TextSearchResponse,
    responses=errors(413, 422, 503),
    summary="Images matching a report sentence",
)
async def search_text(
    query: TextQuery, searcher: SearcherDep, root: UrlRootDep
) -> TextSearchResponse:
    """Embed the sentence with the text encoder (micro-batched with concurrent queries) and return
    the k best images, or studies. `mode` hybrid (the default where the index holds reports)
    weighs three kinds of evidence per image: its cosine similarity to the sentence, the
    sentence of its report nearest the query that agrees with it, and the query's words its
    report asserts; each card's `evidence` says which. Negation is read the way clinical NLP
    reads reports (ConText): "no pneumothorax" finds reports denying one, and a report saying
    "No effusion." never counts as one with an effusion. A sentence past the encoder's token
    limit is cut to its start, and `truncated` says so."""
    started = time.perf_counter()
    options = SearchOptions.of(query)
    found = await searcher.text(query.text, options, root, query.mode, query.fusion)
    return TextSearchResponse(
        **response_fields(found, started),
        mode=found.mode,
        truncated=found.truncated,
        max_tokens=searcher.engine.max_tokens,
    )


@router.post(
    "/image",
    response_model=SearchResponse,
    responses=errors(413, 415, 422, 503),
    summary="Similar cases for an uploaded image, or a region of it",
)
async def search_image(
    file: Annotated[UploadFile, File(description="a PNG, JPEG or DICOM file")],
    searcher: SearcherDep,
    root: UrlRootDep,
    k: Annotated[int, Form(ge=1, le=K_MAX, description="how many results")] = K_DEFAULT,
    filters: Annotated[str | None, Form(description=f"JSON: {FILTERS_DOC}")] = None,
    box: Annotated[
        str | None,
        Form(description='search by a region: "left,top,right,bottom" as fractions of the image'),
    ] = None,
    group_by: Annotated[GroupBy, Form(description=f"one of {', '.join(GROUP_BY)}")] = "study",
    min_score: Annotated[float | None, Form(ge=-1, le=1)] = None,
    must: Annotated[list[str] | None, Form(description=KEYWORDS_DOC)] = None,
    must_not: Annotated[list[str] | None, Form()] = None,
) -> SearchResponse:
    """Decode the upload, crop it to `box` if given, embed it with the image encoder and return the
    k nearest indexed images in the encoder space (the space the index stores for image search)."""
    started = time.perf_counter()
    options = form_options(k, filters, group_by, min_score, must, must_not)
    region = parse_box(box)
    data = image_bytes(await file.read(), file.filename, file.content_type)
    found = await searcher.image(data, options, root, region)
    return SearchResponse(**response_fields(found, started))


@router.post(
    "/refine",
    response_model=SearchResponse,
    responses=errors(404, 413, 422, 503),
    summary="Refine a search by example: more like these, less like those",
)
async def refine(query: RefineQuery, searcher: SearcherDep, root: UrlRootDep) -> SearchResponse:
    """Move the query toward the liked results and away from the disliked ones (Rocchio:
    q' = 1·q + 0.75·mean(liked) − 0.15·mean(disliked) by default, see `weights`), then search
    again. Give the text, or the image_id of a similar-cases search, or neither (liked images
    alone). Disliked images are not returned again unless `exclude_disliked` is false."""
    started = time.perf_counter()
    found = await searcher.refine(query, root)
    return SearchResponse(**response_fields(found, started))
