"""GET /v1/facets: the metadata fields of the served index, with their values and counts.

What a page offers as filters comes from here, so it only offers what the index holds. Fields that
identify a patient or an exam (IDENTIFIERS, and CONVIRT_SENSITIVE_FIELDS) are never listed: a
list of the 50 most frequent patient ids or accession numbers would hand any reader who asks the
archive's patients, unaudited by any search. They stay filterable by name. Fields no menu should
offer (ids, paths, hashes, licences, split, free text, `*_original`: index.read.facets.offered)
are left out too, unless CONVIRT_FACETS_SHOW names them; CONVIRT_FACETS_HIDE hides more. Every
answer is audited like a search."""

from __future__ import annotations

from index.read.facets import offered
from service.search.grouping import _plain

from ..deps import SearcherDep, SettingsDep, reader_router
from ..responses import FacetField, FacetsResponse, FacetValue, errors

router = reader_router("/v1", "search")

# compared without case, "_" or " ": PatientID, patient_id and "Patient ID" are one field
IDENTIFIERS = frozenset(
    _plain(name)
    for name in (
        "PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs", "IssuerOfPatientID",
        "MRN", "medical_record_number", "AccessionNumber", "StudyID",
        "StudyInstanceUID", "study_uid", "SeriesInstanceUID", "series_uid",
        "SOPInstanceUID", "sop_uid", "instance_uid",
    )
)  # fmt: skip


def listed(field: str, sensitive: frozenset[str]) -> bool:
    """Whether /v1/facets may list a field's values."""
    plain = _plain(field)
    return plain not in IDENTIFIERS and plain not in sensitive


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@router.get(
    "/facets",
    responses=errors(503),
    summary="Filterable fields with their values and counts",
)
async def facets(searcher: SearcherDep, settings: SettingsDep) -> FacetsResponse:
    """The fields a page offers as filters: modality, view and the manifest's columns, but
    never a patient's or an exam's identifiers, nor ids, paths, licences, split, free text or
    `*_original` (CONVIRT_FACETS_SHOW lists those it names); placeholder values ("todo", "?")
    are never listed. A field of numbers or ISO dates is a range (low, high); any other lists
    its values, most frequent first (at most 50; `distinct` counts them all)."""
    sensitive = frozenset(_plain(name) for name in names(settings.sensitive_fields))
    show, hide = (frozenset(names(text)) for text in (settings.facets_show, settings.facets_hide))
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
            if listed(facet.field, sensitive) and offered(facet, show, hide)
        ],
    )
