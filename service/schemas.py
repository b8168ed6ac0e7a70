"""Request and response bodies of the JSON API (what clients see; storage lives in `index`)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from index.metadata import CONTROL

K_MAX = 100
K_DEFAULT = 10
ID_MAX = 2**63 - 1  # index ids are positive signed 64-bit integers
FilterValue = str | int | float | bool
FilterRange = dict[str, str | int | float]  # {"gte": low, "lte": high}, either may be left out
Filter = FilterValue | list[FilterValue] | FilterRange
# Bounds on filters: far above any real use, far below what costs the server anything.
MAX_FILTERS = 32
MAX_FILTER_KEY_CHARS = 64
MAX_FILTER_VALUE_CHARS = 512
MAX_FILTER_CHOICES = 64
MAX_KEYWORDS = 16
MAX_KEYWORD_CHARS = 200
MAX_FEEDBACK = 50  # liked or disliked images in one refine
INT64 = (-(2**63), 2**63 - 1)  # what SQLite stores
RANGE_BOUNDS = frozenset({"gte", "lte"})
GROUP_BY = ("study", "patient", "none")
GroupBy = Literal["study", "patient", "none"]
TextMode = Literal["image", "report", "hybrid"]
Fusion = Literal["weighted", "rrf"]
MODE_DOC = (
    "what ranks the images: hybrid (the default where the index holds reports) weighs the "
    "image, the report sentence nearest the query and the query's words the report asserts; "
    "report ranks by the report alone, image by the image alone (the joint space). Negation is "
    "understood: 'no pneumothorax' finds reports that deny a pneumothorax"
)
FILTERS_DOC = (
    "filters on indexed fields (modality, view, manifest columns; see GET /v1/facets): a value "
    '({"modality": "CT"}), any of a list ({"modality": ["CT", "MR"]}) or a range '
    '({"age": {"gte": 40, "lte": 60}}, dates as YYYY-MM-DD text)'
)
KEYWORDS_DOC = (
    "words or phrases the indexed report must assert (must) or must not assert (must_not), "
    "matched on word stems ('effusion' also finds 'effusions'); a report that denies a term "
    "('No effusion.') does not satisfy must and is not excluded by must_not. They filter the "
    "ranking, they do not rank"
)


def valid_unicode(text: str, what: str) -> str:
    """JSON can carry lone surrogates ("\\ud800") that no encoder or database accepts: refuse
    them here, with a 422, rather than fail deep inside the tokenizer or SQLite."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end].encode("unicode_escape").decode()
        raise ValueError(
            f"{what} is not valid Unicode: it holds {bad} at position {err.start} (a lone "
            "surrogate); send UTF-8 text"
        ) from None
    return text


def check_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """Filters as the index can run them: a few flat fields with bounded, storable values."""
    if len(filters) > MAX_FILTERS:
        raise ValueError(f"{len(filters)} filters: at most {MAX_FILTERS} fields per query")
    for key, value in filters.items():
        valid_unicode(key, "a filter field")
        if not key or len(key) > MAX_FILTER_KEY_CHARS:
            raise ValueError(f"filter field names are 1 to {MAX_FILTER_KEY_CHARS} characters")
        if isinstance(value, list):
            if not 1 <= len(value) <= MAX_FILTER_CHOICES:
                raise ValueError(f"filter {key!r}: a list holds 1 to {MAX_FILTER_CHOICES} values")
            for choice in value:
                check_filter_value(key, choice)
        elif isinstance(value, dict):
            if not value or not set(value) <= RANGE_BOUNDS:
                raise ValueError(
                    f'filter {key!r}: a range is {{"gte": low, "lte": high}} (either may be left '
                    "out), nothing else"
                )
            for bound in value.values():
                check_filter_value(key, bound)
        else:
            check_filter_value(key, value)
    return filters


def check_filter_value(key: str, value: Any) -> None:
    if not isinstance(value, str | int | float | bool):
        raise ValueError(
            f"filter {key!r}: a value is a string, number or boolean (or a list of them, or a "
            'range {"gte": low, "lte": high})'
        )
    if isinstance(value, str):
        valid_unicode(value, f"filter {key!r}")
        if len(value) > MAX_FILTER_VALUE_CHARS:
            raise ValueError(
                f"filter {key!r}: values are at most {MAX_FILTER_VALUE_CHARS} characters"
            )
    elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"filter {key!r}: integers must fit in 64 bits")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"filter {key!r}: numbers must be finite")


def check_keywords(terms: list[str], what: str) -> list[str]:
    if len(terms) > MAX_KEYWORDS:
        raise ValueError(f"{what}: at most {MAX_KEYWORDS} words or phrases")
    for term in terms:
        valid_unicode(term, what)
        if CONTROL.search(term):
            raise ValueError(f"{what}: {term!r} holds a control character (NUL, ESC...)")
        if not term.strip() or len(term) > MAX_KEYWORD_CHARS:
            raise ValueError(f"{what}: each word or phrase is 1 to {MAX_KEYWORD_CHARS} characters")
    return terms


class SearchControls(BaseModel):
    """What every search takes besides its query: how many, which images, how they are shown."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(K_DEFAULT, ge=1, le=K_MAX, description="how many results (groups, when grouped)")
    filters: dict[str, Filter] = Field(default_factory=dict, description=FILTERS_DOC)
    must: list[str] = Field(default_factory=list, description=KEYWORDS_DOC)
    must_not: list[str] = Field(default_factory=list, description="see must")
    group_by: GroupBy = Field(
        "study",
        description="one card per study or per patient, its best image first and the others "
        "listed under it (images without the field are their own group); none: every image",
    )
    min_score: float | None = Field(
        None, ge=-1, le=1, description="leave out results whose cosine similarity is below this"
    )

    @field_validator("filters")
    @classmethod
    def bounded_filters(cls, filters: dict[str, Filter]) -> dict[str, Filter]:
        return check_filters(filters)

    @field_validator("must", "must_not")
    @classmethod
    def bounded_keywords(cls, terms: list[str]) -> list[str]:
        return check_keywords(terms, "must and must_not")


class TextQuery(SearchControls):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "text": "Large right pleural effusion.",
                    "k": 10,
                    "filters": {"modality": "XR"},
                    "must": ["effusion"],
                    "must_not": ["pericardial"],
                    "group_by": "study",
                }
            ]
        },
    )

    text: str = Field(description="a report sentence; past the encoder's token limit it is cut")
    mode: TextMode | None = Field(None, description=MODE_DOC)
    fusion: Fusion = Field(
        "weighted",
        description="how hybrid combines its evidence: weighted (a weighted sum of the image, "
        "sentence and word scores) or rrf (reciprocal rank fusion of the three rankings)",
    )

    @field_validator("text")
    @classmethod
    def not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text is empty; send a report sentence")
        return valid_unicode(text, "text")


class RocchioWeights(BaseModel):
    """q' = query·q + liked·mean(liked) − disliked·mean(disliked), then renormalised."""

    model_config = ConfigDict(extra="forbid")

    query: float = Field(1.0, ge=0, le=10)
    liked: float = Field(0.75, ge=0, le=10)
    disliked: float = Field(0.15, ge=0, le=10)


class RefineQuery(SearchControls):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "Large right pleural effusion.", "liked": ["12345"], "disliked": []}
            ]
        },
    )

    text: str | None = Field(None, description="the text query being refined")
    image_id: str | None = Field(
        None, description="the indexed image whose similar cases are being refined"
    )
    liked: list[str] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="ids of relevant results"
    )
    disliked: list[str] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="ids of irrelevant results"
    )
    weights: RocchioWeights = Field(default_factory=RocchioWeights)
    exclude_disliked: bool = Field(True, description="never return a disliked image again")

    @field_validator("text")
    @classmethod
    def not_blank(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("text is empty; leave it out to refine by example only")
        return None if text is None else valid_unicode(text, "text")

    @field_validator("image_id", "liked", "disliked")
    @classmethod
    def image_ids(cls, value):
        for text in [value] if isinstance(value, str) else value or []:
            if not text.isdigit() or int(text) > ID_MAX:
                raise ValueError(f"{text[:40]!r} is not an image id (a decimal integer)")
        return value


class ImageMetadata(BaseModel):
    relpath: str = Field(description="path of the file relative to its source folder or manifest")
    width: int
    height: int
    size_bytes: int
    modality: str | None = None
    view: str | None = None
    fields: dict[str, Any] = Field(
        default_factory=dict, description="manifest columns and DICOM fields"
    )


class GroupMember(BaseModel):
    id: str
    score: float
    thumbnail_url: str


class Group(BaseModel):
    by: str = Field(description="study or patient")
    field: str = Field(description="the metadata field that named the group, e.g. case_id")
    key: str
    size: int = Field(description="images of this group among the matches found")
    more: list[GroupMember] = Field(description="its other matching images, best first")


class DicomUids(BaseModel):
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None


class Evidence(BaseModel):
    """Why a card ranked for a text query: each kind of evidence the score weighs."""

    image: float = Field(description="cosine similarity of the image to the query (joint space)")
    sentence: str | None = Field(
        None, description="the sentence of the image's report nearest the query that agrees with it"
    )
    sentence_score: float | None = Field(None, description="its cosine similarity to the query")
    terms: list[str] = Field(
        default_factory=list,
        description="the query's words the report asserts as asked (present; absent for a "
        "negated query)",
    )
    lexical: float = Field(0.0, description="the rarity-weighted share of those words, 0..1")
    has_report: bool = Field(
        True, description="false: the image has no report, its image score stands in"
    )


class SearchResult(BaseModel):
    id: str = Field(
        description="image id: a 63-bit integer, as a decimal string so JavaScript keeps it exact"
    )
    score: float = Field(
        description="cosine similarity to the query; a text query ranked with the reports "
        "(mode hybrid or report): the fused score, its parts in `evidence`"
    )
    image_url: str
    thumbnail_url: str
    similar_url: str
    metadata: ImageMetadata
    report: str | None = Field(None, description="the report text indexed with the image")
    group: Group | None = Field(
        None, description="the study or patient this card stands for (grouped searches)"
    )
    dicom: DicomUids | None = Field(
        None, description="the DICOM UIDs the metadata holds, to find the image in the PACS"
    )
    viewer_url: str | None = Field(
        None,
        description="the image in the PACS viewer (CONVIRT_VIEWER_URL), when the metadata "
        "holds the UIDs the link needs",
    )
    evidence: Evidence | None = Field(
        None, description="text queries ranked with the reports: why this card ranked"
    )


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float = Field(description="time the service spent on the request")
    index_version: str
    model_fingerprint: str


class TextSearchResponse(SearchResponse):
    mode: TextMode = Field(
        description="what ranked the images: image when the index holds no report sentences "
        "(versions built before them) whatever was asked"
    )
    truncated: bool = Field(
        description="the text ran past the encoder's token limit and only its start was used"
    )
    max_tokens: int = Field(description="the encoder's token limit")


class FindingStatus(BaseModel):
    finding: str
    status: Literal["present", "absent", "uncertain", "historical"]


class SuggestedSentence(BaseModel):
    text: str
    score: float = Field(
        description="how close the sentence is to the image (joint space) and to the similar "
        "cases whose reports hold it"
    )
    cases: list[str] = Field(description="ids of the similar cases whose reports hold it")
    findings: list[FindingStatus] = Field(description="what the sentence asserts")


class SimilarCase(BaseModel):
    id: str
    score: float = Field(description="cosine similarity to the image (encoder space)")
    thumbnail_url: str


class SuggestResponse(BaseModel):
    disclaimer: str = Field(description="a suggestion from retrieved text, not a diagnosis")
    draft: list[str] = Field(
        description="the findings the suggested sentences assert as present, once each"
    )
    sentences: list[SuggestedSentence] = Field(
        description="report sentences of similar cases, best first, without repeats (maximal "
        "marginal relevance)"
    )
    cases: list[SimilarCase] = Field(description="the similar cases whose reports were read")
    took_ms: float
    index_version: str


class FacetValue(BaseModel):
    value: str
    count: int


class FacetField(BaseModel):
    field: str
    kind: Literal["values", "range"]
    distinct: int = Field(description="distinct non-empty values")
    count: int = Field(description="images with a value")
    values: list[FacetValue] = Field(description="kind values: the most frequent first")
    low: float | str | None = Field(None, description="kind range: the smallest value")
    high: float | str | None = Field(None, description="kind range: the largest value")


class FacetsResponse(BaseModel):
    index_version: str
    images: int
    facets: list[FacetField]


class CropBox(BaseModel):
    left: float
    top: float
    width: float
    height: float


class ExplainResponse(BaseModel):
    image_id: str
    space: str = Field(description="joint (a text query) or encoder (an image query)")
    score: float = Field(description="cosine similarity of the whole image to the query")
    grid: list[list[float]] = Field(
        description="rows of cells: how much the similarity drops when the cell is hidden"
    )
    crop: CropBox = Field(
        description="the part of the original image the grid covers, as fractions of its "
        "width and height (the encoder sees a centre crop)"
    )
    took_ms: float
    index_version: str


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(description="machine-readable, e.g. not_an_image, body_too_large")
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    index_version: str | None = None
    model_fingerprint: str | None = None
    images: int | None = None
    query_encoder: str | None = Field(
        None,
        description="what embeds query texts: fp32 (the bundle's model) or int8-onnx "
        "(CONVIRT_QUANTIZE=int8); model_fingerprint is the bundle's either way",
    )


class Whoami(BaseModel):
    mode: Literal["keys", "proxy", "open"] = Field(description="how the service authenticates")
    user: str | None = Field(None, description="the key's name or the proxy user; null: nobody")
    role: Literal["reader", "admin"] | None = None
    note: str | None = Field(None, description="open mode: a warning to show")


class ReloadResponse(BaseModel):
    reloaded: bool = Field(description="false when the newest version was already served")
    previous_version: str
    index_version: str
    images: int
    took_ms: float


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can answer."""
    return {status: {"model": ErrorResponse} for status in statuses}
