"""POST /v1/reports/suggest: what the reports of similar cases said of an image."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from index.suggest import DISCLAIMER

from ..deps import AUDITED, READER, SearcherDep, UrlRootDep
from ..results import image_urls
from ..schemas import (
    ID_MAX,
    FindingStatus,
    SimilarCase,
    SuggestedSentence,
    SuggestResponse,
    errors,
)
from ..searcher import elapsed_ms
from ..uploads import image_bytes

MAX_SENTENCES = 10

router = APIRouter(
    prefix="/v1/reports",
    tags=["reports"],
    dependencies=[AUDITED, READER],
    responses=errors(401, 403, 429),
)


@router.post(
    "/suggest",
    response_model=SuggestResponse,
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
    found, version = await searcher.suggest(data, image_id, count)
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
