"""Request and response bodies of the JSON API (what clients see; storage lives in `index`)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

K_MAX = 100
K_DEFAULT = 10
ID_MAX = 2**63 - 1  # index ids are positive signed 64-bit integers
FilterValue = str | int | float | bool
# Bounds on filters: far above any real use, far below what costs the server anything.
MAX_FILTERS = 32
MAX_FILTER_KEY_CHARS = 64
MAX_FILTER_VALUE_CHARS = 512
INT64 = (-(2**63), 2**63 - 1)  # what SQLite stores


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
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"filter {key!r}: a value is a string, number or boolean")
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
    return filters


class TextQuery(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"text": "No pleural effusion or pneumothorax.", "k": 10, "filters": {}}]
        },
    )

    text: str = Field(description="a report sentence; past the encoder's token limit it is cut")
    k: int = Field(K_DEFAULT, ge=1, le=K_MAX, description="how many images to return")
    filters: dict[str, FilterValue] = Field(
        default_factory=dict,
        description="equality filters on indexed fields: modality, view, or manifest columns",
    )

    @field_validator("text")
    @classmethod
    def not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text is empty; send a report sentence")
        return valid_unicode(text, "text")

    @field_validator("filters")
    @classmethod
    def bounded_filters(cls, filters: dict[str, FilterValue]) -> dict[str, FilterValue]:
        return check_filters(filters)


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


class SearchResult(BaseModel):
    id: str = Field(
        description="image id: a 63-bit integer, as a decimal string so JavaScript keeps it exact"
    )
    score: float = Field(description="cosine similarity to the query")
    image_url: str
    thumbnail_url: str
    similar_url: str
    metadata: ImageMetadata
    report: str | None = Field(None, description="the report text indexed with the image")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    took_ms: float = Field(description="time the service spent on the request")
    index_version: str
    model_fingerprint: str


class TextSearchResponse(SearchResponse):
    truncated: bool = Field(
        description="the text ran past the encoder's token limit and only its start was used"
    )
    max_tokens: int = Field(description="the encoder's token limit")


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


class ReloadResponse(BaseModel):
    reloaded: bool = Field(description="false when the newest version was already served")
    previous_version: str
    index_version: str
    images: int
    took_ms: float


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can answer."""
    return {status: {"model": ErrorResponse} for status in statuses}
