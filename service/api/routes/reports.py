"""POST /v1/reports/suggest: what the reports of similar cases said of an image."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import File, Form, UploadFile

from index.read.limits import ID_MAX, MAX_SENTENCES
from index.read.suggest import DISCLAIMER
from service.guard import audit

from ..deps import SearcherDep, UrlRootDep, reader_router
from ..errors import ApiError
from ..responses import FindingStatus, SimilarCase, SuggestedSentence, SuggestResponse, errors
from ..results import elapsed_ms, image_urls
from ..uploads import image_bytes

router = reader_router("/v1/reports", "reports")


@router.post(
    "/suggest",
    responses=errors(404, 409, 413, 415, 422, 503),
    summary="Report sentences of similar cases for an image: a suggestion, not a diagnosis",
)
async def suggest(
    searcher: SearcherDep,
    root: UrlRootDep,
    file: Annotated[UploadFile | None, File(description="a PNG, JPEG or DICOM file")] = None,
    image_id: Annotated[
        int | None, Form(ge=0, le=ID_MAX, description="or an indexed image, by id")
    ] = None,
    count: Annotated[int, Form(ge=1, le=MAX_SENTENCES, description="sentences at most")] = 5,
) -> SuggestResponse:
    """Retrieval-based report drafting (CXR-RePaiR): the report sentences closest to the image in
    the joint space and those of its most similar archived cases, scored by both, without
    repeats (maximal marginal relevance), each with the cases that hold it and what it asserts;
    `draft` lists the findings they assert as present. An indexed image's own study is left out.

    **This is a suggestion assembled from retrieved text, not a diagnosis**: every sentence
    comes from another patient's report and must be checked against the image."""
    started = time.perf_counter()
    data = None
    if file is not None:
        data = image_bytes(await file.read(), file.filename, file.content_type)
    image: bytes | int
    if data is not None and image_id is None:
        image = data
        audit.note_upload(data)
    elif data is None and image_id is not None:
        image = image_id
        audit.note_image(image_id)
    else:
        raise ApiError(422, "invalid_query", "give either an image file or image_id, not both")
    found, version = await searcher.suggest(image, count)
    return SuggestResponse(
        disclaimer=DISCLAIMER,
        draft=found.draft,
        sentences=[
            SuggestedSentence(
                text=s.text,
                score=round(s.score, 6),
                cases=[str(i) for i in s.cases],
                findings=[FindingStatus(finding=f, status=st) for f, st in s.findings],
            )
            for s in found.sentences
        ],
        cases=[
            SimilarCase(
                id=str(i), score=round(score, 6), thumbnail_url=image_urls(root, i)["thumbnail_url"]
            )
            for i, score in found.cases
        ],
        took_ms=elapsed_ms(started),
        index_version=version,
    )
