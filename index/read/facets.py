"""Facets: what the filters can ask for, the values of every filterable field with counts."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from .filters import SAFE_KEY, _number_sql

FACET_COLUMNS = ("modality", "view")


@dataclass(frozen=True)
class Facet:
    """The values of one filterable field across a version.

    kind "values": `values` holds (value, image count), most frequent first. kind "range": every
    value is a number (low/high are floats) or every value an ISO date in one format (low/high
    are the stored text, which is what a range filter with string bounds compares)."""

    field: str  # "modality", "view" or a manifest field name
    kind: str  # "values" or "range"
    values: list[tuple[str, int]]  # kind "values": (value, image count), most frequent first
    distinct: int  # number of distinct non-empty values
    low: float | str | None = None  # kind "range": the smallest value
    high: float | str | None = None
    count: int = 0  # images with a non-empty value


DATE_FORMATS = (
    (re.compile(r"\d{4}-\d{2}-\d{2}"), "%Y-%m-%d"),
    (re.compile(r"\d{8}"), "%Y%m%d"),
)


def facets(conn: sqlite3.Connection, fields: frozenset[str]) -> list[Facet]:
    """Every value of modality, view and each manifest field a filter may name, with counts.

    Empty strings and NULL are left out, and fields without any value. Numbers are told apart
    from text exactly as a numeric range filter does (the value's text is a JSON number)."""
    # field -> its text value -> [images, the value as a number or None]
    counted: dict[str, dict[str, list]] = {}
    for column in FACET_COLUMNS:
        counted[column] = {}
        rows = conn.execute(
            f"SELECT {column}, COUNT(*), {_number_sql(column)} FROM images "
            f"WHERE {column} IS NOT NULL AND {column} != '' GROUP BY {column}"
        )
        _count(counted[column], rows)
    names = sorted(name for name in fields if name not in FACET_COLUMNS and SAFE_KEY.match(name))
    for name in names:
        counted[name] = {}
    if names:
        rows = conn.execute(
            f"SELECT j.key, j.value, COUNT(*), {_number_sql('j.value')} "
            "FROM images, json_each(images.meta) AS j "
            "WHERE j.type IN ('text', 'integer', 'real') AND j.value != '' "
            "GROUP BY j.key, j.value"
        )
        for key, *rest in rows:
            if key in counted and key not in FACET_COLUMNS:
                _count(counted[key], [rest])
    return [_facet(name, values) for name, values in counted.items() if values]


def _count(values: dict[str, list], rows: Iterable[tuple]) -> None:
    for value, n, number in rows:
        values.setdefault(str(value), [0, number])[0] += n  # one text, possibly two JSON types


def _facet(name: str, values: dict[str, list]) -> Facet:
    count = sum(n for n, _ in values.values())
    texts = list(values)
    if _all_dates(texts):
        return Facet(name, "range", [], len(texts), min(texts), max(texts), count)
    numbers = [number for _, number in values.values()]
    if all(number is not None for number in numbers):
        return Facet(name, "range", [], len(texts), min(numbers), max(numbers), count)
    ranked = sorted(((value, n) for value, (n, _) in values.items()), key=lambda i: (-i[1], i[0]))
    return Facet(name, "values", ranked, len(texts), count=count)


def _all_dates(texts: list[str]) -> bool:
    """Whether every text is a real calendar date in one of DATE_FORMATS, the same for all (a
    mix of formats would not sort as text)."""
    for pattern, layout in DATE_FORMATS:
        if all(pattern.fullmatch(text) and _is_date(text, layout) for text in texts):
            return True
    return False


def _is_date(text: str, layout: str) -> bool:
    try:
        datetime.strptime(text, layout)
    except ValueError:
        return False
    return True
