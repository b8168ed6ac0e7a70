"""Response bodies of the JSON API (what clients see; storage lives in `index`), and the OpenAPI
error entries of a route (queries.py: the request bodies)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, Field

from index.fields import BODY_PARTS, MODALITIES
from index.read import sentences

from .queries import TextMode


class ImageMetadata(BaseModel):
    relpath: str = Field(description="path of the file relative to its source folder or manifest")
    width: int
    height: int
    size_bytes: int
    modality: str | None = Field(
        None,
        description="normalised (as `case.modality`); the source's text: fields.modality_original",
    )
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


class CaseSummary(BaseModel):
    """A card's case in a clinician's words (service/search/case.py has the rules); every field
    is null where the metadata does not say."""

    title: str | None = Field(
        None,
        description="the diagnosis, else the impression, finding or case title, else the "
        "report's first sentence; never a path",
    )
    age: str | None = None
    sex: str | None = Field(None, description="male, female or other")
    exam: str | None = Field(None, description='normalised modality and body part: "CT · Chest"')
    modality: str | None = Field(
        None, description=f"normalised: {', '.join(MODALITIES)} or other (index/fields.py)"
    )
    body_part: str | None = Field(
        None, description=f"normalised: {', '.join(BODY_PARTS)} or other; null: nothing says"
    )
    date: str | None = Field(None, description="YYYY-MM-DD (the study date) when known")
    source: str | None = Field(None, description="the dataset or archive the image comes from")
    licence: str | None = Field(None, description="the image's licence text, when it has one")


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
    match: Literal["strong", "possible", "weak"] | None = Field(
        None,
        description="what the score means on this index for this kind of query (the "
        "response's `scale`; GET /v1/scores): null while the index version is being "
        "calibrated, or where it cannot be (no report sentences, ten images or fewer)",
    )
    case: CaseSummary | None = Field(
        None, description="what a clinician reads first: diagnosis, age, sex, exam, date"
    )


class ScoreScale(BaseModel):
    """What scores of one kind of query mean on the served index (service/search/calibration.py):
    strong at or above `strong`, possible at or above `possible`, weak below."""

    kind: str = Field(
        description="text_hybrid, text_dense (mode image, or a refined text), text_report, "
        "text_hybrid_rrf, text_report_rrf, or image (an image, a region, similar, refined "
        "images)"
    )
    strong: float = Field(description="the best match of a typical indexed case (median)")
    possible: float = Field(description="the tenth match of a typical indexed case (median)")
    low: float = Field(description="scores of this kind usually lie between low and high")
    high: float


class SearchResponse(BaseModel):
    results: list[SearchResult]
    scale: ScoreScale | None = Field(
        None, description="what the scores mean (null while the index is being calibrated)"
    )
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


class ImageSearchResponse(SearchResponse):
    upload_id: str = Field(
        description="the upload, kept a while for its uploader: send it instead of the file "
        "(a region), to POST /v1/search/refine, GET /v1/explain and /v1/uploads/{id}/pixels"
    )


class ScoresResponse(BaseModel):
    index_version: str
    scales: list[ScoreScale] = Field(
        description="every kind calibrated so far (all of them a few seconds after a start or "
        "a reload)"
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

    @classmethod
    def each(cls, pairs: Iterable[tuple[str, str]]) -> list[FindingStatus]:
        """(finding, status) pairs as the index reads them, as the API answers them."""
        return [cls(finding=finding, status=status) for finding, status in pairs]


class ReportSentence(BaseModel):
    text: str = Field(description="the sentence as the index split and embedded it")
    start: int | None = Field(
        None, description="where it starts in `report` (character offset); null if not found"
    )
    end: int | None = Field(None, description="where it ends in `report` (exclusive)")
    findings: list[FindingStatus] = Field(
        default_factory=list, description="the findings it names and what it asserts of each"
    )

    @classmethod
    def of(cls, sentence: sentences.ReportSentence) -> ReportSentence:
        """A sentence as the index read it (index.read.sentences.read_report)."""
        return cls(
            text=sentence.text,
            start=sentence.start,
            end=sentence.end,
            findings=FindingStatus.each(sentence.findings),
        )


class ImageReport(BaseModel):
    id: str
    report: str | None = Field(None, description="the report text indexed with the image")
    sentences: list[ReportSentence] = Field(
        default_factory=list, description="the report's sentences, in order"
    )


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
