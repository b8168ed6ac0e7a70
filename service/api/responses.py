"""Response bodies of the JSON API (what clients see; storage lives in `index`), and the OpenAPI
error entries of a route (queries.py: the request bodies)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .queries import TextMode


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
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="milliseconds per stage of the search, those it ran, in order: decode (an "
        "image query's file), queue (waiting for the model), encode, filter (the ids filters "
        "and keywords allow), faiss, reports (a text query ranked with the reports), grouping, "
        "describe. Their sum is under took_ms; /metrics has each stage's histogram",
    )


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


class PacsServer(BaseModel):
    url: str
    status: Literal["reachable", "unreachable", "unknown"] = Field(
        description="what the last fetch from it found (unknown: nothing fetched yet)"
    )
    last_ok_at: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    fetching: int = Field(0, description="fetches from it now running or waiting")


class PacsReadiness(BaseModel):
    """/readyz's `pacs` section (service/search/pacs.py PacsStatus)."""

    status: Literal["ok", "degraded", "unused"] = Field(
        description="degraded: a PACS failed its last fetch (searches still answer; its images "
        "may not); unused: no image was fetched from a PACS yet"
    )
    threads: int
    busy: int = Field(description="fetch threads in use (one stuck past its deadline counts)")
    queued: int
    servers: list[PacsServer] = []


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
