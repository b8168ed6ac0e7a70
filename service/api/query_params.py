"""The search controls as the routes take them: from a JSON body (queries.py SearchControls),
or from form or query-string fields made from SearchControls' own fields (search_fields), all
checked the same way and adapted to the search core's plain SearchOptions and Refinement
(results.py packs its answer).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from annotated_types import Ge, Le
from fastapi import Depends, Form, Query
from pydantic import ValidationError

from index.read.keywords import Keywords
from index.read.limits import MAX_FILTERS_JSON_CHARS
from service.search.feedback import Weights
from service.search.query import Refinement, SearchOptions

from .errors import ApiError
from .queries import FILTERS_DOC, RefineQuery, SearchControls
from .uploads import parse_box

# fields a form or query string carries as text: filters as JSON, must and must_not repeated
AS_TEXT: dict[str, Any] = {
    "filters": (str | None, f"JSON: {FILTERS_DOC}"),
    "must": (list[str] | None, None),
    "must_not": (list[str] | None, None),
}


def search_fields(kind: Callable[..., Any]) -> Callable[..., Awaitable[SearchOptions]]:
    """A FastAPI dependency taking SearchControls' fields as `kind` (fastapi.Form or Query)
    fields, with their defaults, bounds and descriptions, checked as a JSON body's are."""
    parameters = []
    for name, field in SearchControls.model_fields.items():
        annotation, description = AS_TEXT.get(name, (field.annotation, None))
        bounds = {}
        for rule in field.metadata:
            if isinstance(rule, Ge):
                bounds["ge"] = rule.ge
            elif isinstance(rule, Le):
                bounds["le"] = rule.le
        default = None if name in AS_TEXT else field.default
        declared = kind(description=description or field.description, **bounds)
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[annotation, declared],
            )
        )

    async def options(**fields: Any) -> SearchOptions:
        return fields_options(**fields)

    options.__signature__ = inspect.Signature(parameters, return_annotation=SearchOptions)  # type: ignore[attr-defined]
    return options


def fields_options(
    k: int,
    filters: str | None,
    must: list[str] | None,
    must_not: list[str] | None,
    group_by: str,
    min_score: float | None,
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
    return search_options(controls)


def search_options(controls: SearchControls) -> SearchOptions:
    """The search core's plain options of a request's controls."""
    keywords = None
    if controls.must or controls.must_not:
        keywords = Keywords(tuple(controls.must), tuple(controls.must_not))
    return SearchOptions(
        controls.k, controls.filters, keywords, controls.group_by, controls.min_score
    )


def refinement(query: RefineQuery) -> Refinement:
    weights = query.weights
    return Refinement(
        query.text,
        None if query.image_id is None else int(query.image_id),
        tuple(int(i) for i in query.liked),
        tuple(int(i) for i in query.disliked),
        Weights(weights.query, weights.liked, weights.disliked),
        query.exclude_disliked,
        box=parse_box(query.box),
    )


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


# the controls of a multipart upload (POST /v1/search/image) and of a query string (GET similar)
SearchForm = Annotated[SearchOptions, Depends(search_fields(Form))]
SearchQuery = Annotated[SearchOptions, Depends(search_fields(Query))]
# their region box, as text (uploads.parse_box reads it)
BoxForm = Annotated[
    str | None,
    Form(description='search by a region: "left,top,right,bottom" as fractions of the image'),
]
BoxQuery = Annotated[
    str | None, Query(description='a region: "left,top,right,bottom" as fractions of the image')
]
