"""POST /v1/reports/suggest: what the reports of similar cases said of an image."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import File, Form, UploadFile

from index.read.limits import ID_MAX, MAX_SENTENCES
from index.read.suggest import DISCLAIMER
from service.guard import audit

from ..deps import KeptUploadsDep, PrincipalDep, SearcherDep, UrlRootDep, kept_upload, reader_router
from ..errors import ApiError
from ..queries import UPLOAD_ID, UPLOAD_ID_DOC
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
    principal: PrincipalDep,
    uploads: KeptUploadsDep,
    file: Annotated[UploadFile | None, File(description="a PNG, JPEG or DICOM file")] = None,
    image_id: Annotated[
        int | None, Form(ge=0, le=ID_MAX, description="or an indexed image, by id")
    ] = None,
    upload_id: Annotated[
        str | None, Form(pattern=UPLOAD_ID, description=f"or {UPLOAD_ID_DOC}")
    ] = None,
    count: Annotated[int, Form(ge=1, le=MAX_SENTENCES, description="sentences at most")] = 5,
) -> SuggestResponse:
    """Retrieval-based report drafting (CXR-RePaiR): the report sentences closest to the image in
    the joint space and those of its most similar archived cases, scored by both, without
    repeats (maximal marginal relevance), each with the cases that hold it and what it asserts;
    `draft` lists the findings they assert as present. An indexed image's own study is left out.

    **This is a suggestion assembled from retrieved text, not a diagnosis**: every sentence
    comes from another patient's report and must be checked against the image. Give exactly
    one of `file`, `image_id` and `upload_id` (an upload kept by POST /v1/search/image; 404
    `unknown_upload` when it is no longer kept: upload the image again)."""
    started = time.perf_counter()
    if sum(given is not None for given in (file, image_id, upload_id)) != 1:
        raise ApiError(
            422, "invalid_query", "give one of an image file, image_id or upload_id, not several"
        )
    image: bytes | int
    if file is not None:
        image = image_bytes(await file.read(), file.filename, file.content_type)
        audit.note_upload(image)
    elif upload_id is not None:
        image = kept_upload(uploads, principal, upload_id).data  # noted in the audit record
    else:
        image = image_id
        audit.note_image(image_id)
    found, version = await searcher.suggest(image, count)
    return SuggestResponse(
        disclaimer=DISCLAIMER,
        draft=found.draft,
        sentences=[
            SuggestedSentence(
                text=s.text,
                score=round(s.score, 6),
                cases=[str(i) for i in s.cases],
                findings=FindingStatus.each(s.findings),
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
