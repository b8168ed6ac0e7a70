"""POST /v1/search/text, /image and /refine: a sentence, an image (or a region) or feedback in,
images out. Each route notes its query in the request's audit record (service.guard.audit), hands
it to the Searcher as plain options, notes the result ids and packs the answer (results.py)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated

from fastapi import File, Form, UploadFile

from service.guard import audit

from ..deps import (
    KeptUploadsDep,
    PrincipalDep,
    SearcherDep,
    UrlRootDep,
    kept_upload,
    reader_router,
)
from ..errors import ApiError
from ..queries import UPLOAD_ID, UPLOAD_ID_DOC, RefineQuery, TextQuery
from ..query_params import BoxForm, SearchForm, refinement, search_options
from ..responses import ImageSearchResponse, SearchResponse, TextSearchResponse, errors
from ..results import response_fields
from ..uploads import image_bytes, parse_box

router = reader_router("/v1/search", "search")


@router.post(
    "/text",
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
    options = search_options(query)
    audit.note_query(query.text)
    found = await searcher.text(query.text, options, query.mode, query.fusion)
    audit.note_results(found.results)
    return TextSearchResponse(
        **response_fields(found, started, root),
        mode=found.mode,
        truncated=found.truncated,
        max_tokens=searcher.engine.max_tokens,
    )


@router.post(
    "/image",
    responses=errors(404, 413, 415, 422, 503),
    summary="Similar cases for an uploaded image, or a region of it",
)
async def search_image(
    searcher: SearcherDep,
    root: UrlRootDep,
    principal: PrincipalDep,
    uploads: KeptUploadsDep,
    options: SearchForm,
    file: Annotated[UploadFile | None, File(description="a PNG, JPEG or DICOM file")] = None,
    upload_id: Annotated[
        str | None, Form(pattern=UPLOAD_ID, description=f"instead of file: {UPLOAD_ID_DOC}")
    ] = None,
    box: BoxForm = None,
) -> ImageSearchResponse:
    """Decode the upload, crop it to `box` if given, embed it with the image encoder and return the
    k nearest indexed images in the encoder space (the space the index stores for image search).

    The upload is kept a while (CONVIRT_UPLOAD_TTL_S after its last use) for whoever sent it:
    the answer's `upload_id` stands for it instead of the file here (a region of it), in POST
    /v1/search/refine, GET /v1/explain and GET /v1/uploads/{upload_id}/pixels. An unknown,
    expired or someone else's upload_id is a 404 `unknown_upload`: upload the image again."""
    started = time.perf_counter()
    region = parse_box(box)
    if (file is None) == (upload_id is None):
        raise ApiError(
            422,
            "invalid_request",
            "send the image as `file`, or the `upload_id` of one sent before: one of them",
        )
    if file is not None:
        data = image_bytes(await file.read(), file.filename, file.content_type)
        audit.note_upload(data)
        found = await searcher.image(data, options, region)
        upload = uploads.keep(principal.user, data)  # kept only once it decoded
    else:
        upload = kept_upload(uploads, principal, upload_id)
        known = upload.vector if region is None else upload.regions.get(region)
        found = await searcher.image(upload.data, options, region, known)
    # the vector searched by, kept with the upload: the whole image's or the region's
    if region is None:
        upload.vector = found.vector
    else:
        upload.keep_region(region, found.vector)
    audit.note_results(found.results)
    return ImageSearchResponse(**response_fields(found, started, root), upload_id=upload.id)


@router.post(
    "/refine",
    responses=errors(404, 413, 422, 503),
    summary="Refine a search by example: more like these, less like those",
)
async def refine(
    query: RefineQuery,
    searcher: SearcherDep,
    root: UrlRootDep,
    principal: PrincipalDep,
    uploads: KeptUploadsDep,
) -> SearchResponse:
    """Move the query toward the liked results and away from the disliked ones (Rocchio:
    q' = 1·q + 0.75·mean(liked) − 0.15·mean(disliked) by default, see `weights`), then search
    again. Give the text, or the image_id of a similar-cases search, or the upload_id of an
    image search (the upload stays the query), or none (liked images alone); with image_id or
    upload_id, `box` refines the region searched (its vector is the query, as the box of the
    similar-cases or image search makes it). Disliked images are not returned again unless
    `exclude_disliked` is false."""
    started = time.perf_counter()
    refined = refinement(query)
    options = search_options(query)
    audit.note_query(refined.text)
    audit.note_image(refined.image_id)
    if query.upload_id is not None:
        upload = kept_upload(uploads, principal, query.upload_id)
        vector = await searcher.upload_vector(upload, refined.box)
        refined = replace(refined, upload=vector, box=None)
    found = await searcher.refine(refined, options)
    audit.note_results(found.results)
    return SearchResponse(**response_fields(found, started, root))
