"""What a search may ask: the JSON request bodies and the checks that keep them within what the
index can run (the bounds: index/read/limits.py). SearchControls is declared once here; the form
and query-string fields of the upload and similar-cases routes are made from it
(query_params.py). responses.py: the answers."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from index.read.keywords import CONTROL
from index.read.limits import (
    ID_MAX,
    INT64,
    K_DEFAULT,
    K_MAX,
    MAX_FEEDBACK,
    MAX_FILTER_CHOICES,
    MAX_FILTER_KEY_CHARS,
    MAX_FILTER_VALUE_CHARS,
    MAX_FILTERS,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
    RANGE_BOUNDS,
)

FilterValue = str | int | float | bool
FilterRange = dict[str, str | int | float]  # {"gte": low, "lte": high}, either may be left out
Filter = FilterValue | list[FilterValue] | FilterRange
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
UPLOAD_ID = r"^[A-Za-z0-9_-]{1,64}$"  # service/search/kept.py's tokens
UPLOAD_ID_DOC = "an upload_id of POST /v1/search/image: the upload kept for its uploader"
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
            if not value or not set(value) <= set(RANGE_BOUNDS):
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
    upload_id: str | None = Field(
        None,
        pattern=UPLOAD_ID,
        description=f"{UPLOAD_ID_DOC}, whose similar cases are being refined (it stays the query)",
    )
    box: str | None = Field(
        None,
        max_length=200,
        description='with image_id or upload_id: the region being refined, "left,top,right,'
        'bottom" as fractions of the image (as the box of /v1/search/image and of '
        "/v1/images/{id}/similar); the region's vector is the query",
    )
    liked: list[str] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="ids of relevant results"
    )
    disliked: list[str] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="ids of irrelevant results"
    )
    weights: RocchioWeights = Field(default_factory=RocchioWeights)
    exclude_disliked: bool = Field(True, description="never return a disliked image again")

    @model_validator(mode="after")
    def one_query(self) -> RefineQuery:
        if self.upload_id is not None and (self.text is not None or self.image_id is not None):
            raise ValueError("give one of text, image_id or upload_id as the query, not several")
        image = self.image_id is not None or self.upload_id is not None
        if self.box is not None and (self.text is not None or not image):
            raise ValueError("box is a region of the image_id or upload_id being refined: give one")
        return self

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
