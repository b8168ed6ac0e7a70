"""GET /v1/facets: the metadata fields of the served index, with their values and counts.

What a page offers as filters comes from here, so it only offers what the index holds."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import READER, SearcherDep
from ..schemas import FacetField, FacetsResponse, FacetValue, errors

router = APIRouter(
    prefix="/v1", tags=["search"], dependencies=[READER], responses=errors(401, 403, 429)
)


@router.get(
    "/facets",
    response_model=FacetsResponse,
    responses=errors(503),
    summary="Filterable fields with their values and counts",
)
async def facets(searcher: SearcherDep) -> FacetsResponse:
    """Every field a filter may name: modality, view and the manifest's columns. A field of
    numbers or ISO dates is a range (low, high); any other lists its values, most frequent first
    (at most 50; `distinct` counts them all)."""
    version, images, found = await searcher.facets()
    return FacetsResponse(
        index_version=version,
        images=images,
        facets=[
            FacetField(
                field=facet.field,
                kind=facet.kind,
                distinct=facet.distinct,
                count=facet.count,
                values=[FacetValue(value=value, count=count) for value, count in facet.values],
                low=facet.low,
                high=facet.high,
            )
            for facet in found
        ],
    )
