"""Search options from form or query-string fields, checked as a JSON body's are; responses."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from .errors import ApiError
from .schemas import MAX_FILTER_KEY_CHARS, MAX_FILTER_VALUE_CHARS, MAX_FILTERS, SearchControls
from .searcher import Found, SearchOptions, elapsed_ms


def response_fields(found: Found, started: float) -> dict[str, Any]:
    return {
        "results": found.results,
        "took_ms": elapsed_ms(started),
        "index_version": found.index_version,
        "model_fingerprint": found.model_fingerprint,
    }


def form_options(
    k: int,
    filters: str | None,
    group_by: str,
    min_score: float | None,
    must: list[str] | None,
    must_not: list[str] | None,
) -> SearchOptions:
    """Search options from form or query fields, checked as a JSON body's are."""
    try:
        controls = SearchControls(
            k=k,
            filters=parse_filters(filters),
            group_by=group_by,
            min_score=min_score,
            must=must or [],
            must_not=must_not or [],
        )
    except ValidationError as err:
        problems = err.errors()
        code = "invalid_filters" if problems[0]["loc"][:1] == ("filters",) else "invalid_request"
        message = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems)
        raise ApiError(422, code, message) from None
    return SearchOptions.of(controls)


def parse_filters(text: str | None) -> dict[str, Any]:
    """The form field `filters` (JSON text), parsed; its values are checked by SearchControls."""
    if not text:
        return {}
    if len(text) > MAX_FILTERS_JSON_CHARS:  # before parsing: nesting 10,000 deep is short text
        raise ApiError(
            422, "invalid_filters", f"filters is longer than {MAX_FILTERS_JSON_CHARS} characters"
        )
    try:
        filters = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ApiError(422, "invalid_filters", f"filters is not valid JSON: {err}") from err
    if not isinstance(filters, dict):
        raise ApiError(422, "invalid_filters", "filters must be a JSON object of field: value")
    return filters


# Room for MAX_FILTERS fields of the longest names and values (or short lists), and no more.
MAX_FILTERS_JSON_CHARS = MAX_FILTERS * (MAX_FILTER_KEY_CHARS + 4 * MAX_FILTER_VALUE_CHARS + 8)
