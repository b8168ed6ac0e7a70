"""GET /v1/images/{id}/report: an indexed image's report, read sentence by sentence.

The page's report panel shows the whole report with the sentence that matched highlighted and
the sentences that deny a finding ("No effusion.") marked: so it gets the report split exactly
as the index split it, each sentence with its offsets into the text and what it asserts
(index.read.sentences.read_report). Report text is patient data: audited like the image file.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from index.read.sentences import read_report
from service.guard import audit

from ..deps import ImageId, StoreDep, reader_router
from ..responses import ImageReport, ReportSentence, errors
from .images import known_row

router = reader_router("/v1/images", "images")


@router.get(
    "/{image_id}/report",
    responses=errors(404, 422),
    summary="The image's report, split into sentences with what each asserts",
)
async def image_report(image_id: ImageId, store: StoreDep) -> ImageReport:
    """The report indexed with the image (null when it has none), and its sentences as the
    index split them: `start`/`end` are character offsets into `report`, `findings` what each
    sentence asserts of the findings it names (present, absent, uncertain, historical)."""
    audit.note_image(image_id)
    row = await run_in_threadpool(known_row, store, image_id)
    report = row.get("report") or None
    read = await run_in_threadpool(read_report, report or "")
    sentences = [ReportSentence.of(sentence) for sentence in read]
    return ImageReport(id=str(image_id), report=report, sentences=sentences)
