"""Request and response bodies of the JSON API (what clients see; storage lives in `index`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

K_MAX = 100
K_DEFAULT = 10
ID_MAX = 2**63 - 1  # index ids are positive signed 64-bit integers
FilterValue = str | int | float | bool


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
        return text


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
