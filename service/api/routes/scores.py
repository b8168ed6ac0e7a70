"""GET /v1/scores: what scores mean on the served index, per kind of query (strong, possible, weak;
service/search/calibration.py), for the threshold input's hint. Search responses carry their own
kind's `scale`, and each result its `match`."""

from __future__ import annotations

from ..deps import SearcherDep, reader_router
from ..responses import ScoreScale, ScoresResponse, errors

router = reader_router("/v1", "search")


@router.get("/scores", responses=errors(503), summary="What scores mean, per kind of query")
async def scores(searcher: SearcherDep) -> ScoresResponse:
    """The scale of every kind of query calibrated so far on the served index version: computed
    once per version in the background from the index itself (a sample of its images and report
    sentences searched against it, their own images left out), a few seconds after a start or
    a reload; until then the list is short or empty."""
    version = searcher.stores.current.version
    return ScoresResponse(
        index_version=version,
        scales=[
            ScoreScale.model_validate(scale, from_attributes=True)
            for scale in searcher.scales.all(version).values()
        ],
    )
