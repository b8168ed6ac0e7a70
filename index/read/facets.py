"""Facets: what the filters can ask for, the values of every filterable field with counts, and
the rule of which fields a page's menus offer (`offered`): not ids, paths, hashes, licences,
splits, free text or the archive's own spellings behind a normalised field (index/fields.py),
unless a setting says otherwise. Placeholder values ("todo", "?") are never counted as values.

`facets` computes them by reading every row; a version written since issue 25 holds them, computed
so when it was published (index/write/lookups.py), and a server reads them back (`stored_facets`)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from ..fields import BODY_PART_SOURCES, MODALITY_SOURCES
from ..metadata import FACET_FIELDS, FACET_VALUES, has_table
from .filters import SAFE_KEY, _number_sql

FACET_COLUMNS = ("modality", "view")
# values that stand for "nobody filled this in": never a menu item, never breaking a range
PLACEHOLDERS = frozenset(
    {"", "?", "??", "-", "--", "todo", "tbd", "n/a", "na", "null", "none", "unknown", "left blank"}
)
# -- which fields a page offers (the route applies it; CONVIRT_FACETS_SHOW / _HIDE override) ------
# a field whose name's last word is one of these names a thing, not a kind of thing
ID_WORDS = frozenset(
    {"id", "ids", "uid", "uuid", "hash", "sha256", "md5", "path", "relpath", "url", "doi", "split",
     "licence", "license", "original", "article", "number", "width", "height", "bytes"}
)  # fmt: skip
# free text: a menu of a report's words or of every diagnosis is not a filter
TEXT_FIELDS = frozenset(
    {"text", "report", "caption", "findings", "diagnosis", "impression", "case_title", "title",
     "history", "description", "comment", "comments", "notes"}
)  # fmt: skip
# the archive's own spellings behind `modality` and `body_part`: one menu per thing
NORMALISED_SOURCES = frozenset({*MODALITY_SOURCES, *BODY_PART_SOURCES} - {"modality", "body_part"})
MAX_MENU = 200  # more distinct values than this: names or free text, not a kind of thing


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


def facets(
    conn: sqlite3.Connection,
    fields: frozenset[str],
    counts: Callable[[str], Iterable[tuple]] | None = None,
) -> list[Facet]:
    """Every value of modality, view and each manifest field a filter may name, with counts.

    Empty strings and NULL are left out, and fields without any value. Numbers are told apart
    from text exactly as a numeric range filter does (the value's text is a JSON number).
    counts: field -> its rows (value, images, the value as a number or None) where the JSON
    value is text or a number, in place of parsing every row's JSON (index/write/lookups.py
    counts them from its field tables)."""
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
    if counts is not None:
        for name in names:
            _count(counted[name], counts(name))
    elif names:
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


def stored_facets(conn: sqlite3.Connection, schema: str = "main") -> list[Facet] | None:
    """The facets a version was published with (index/write/lookups.py: the same as `facets`,
    each field's values cut to the most frequent STORED_VALUES), or None in a version written
    before they were stored. schema: the attached database to read (a segment)."""
    if not has_table(conn, FACET_FIELDS, schema):
        return None
    values: dict[int, list[tuple[str, int]]] = {}
    for position, value, n in conn.execute(
        f"SELECT position, value, images FROM {schema}.{FACET_VALUES} ORDER BY position, rank"
    ):
        values.setdefault(position, []).append((value, n))
    rows = conn.execute(
        "SELECT position, field, kind, distinct_values, low, high, images "
        f"FROM {schema}.{FACET_FIELDS} ORDER BY position"
    )
    return [
        Facet(field, kind, values.get(position, []), distinct, low, high, count)
        for position, field, kind, distinct, low, high, count in rows
    ]


def _count(values: dict[str, list], rows: Iterable[tuple]) -> None:
    for value, n, number in rows:
        if is_placeholder(value):
            continue
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


def is_placeholder(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() in PLACEHOLDERS


def _words(field: str) -> list[str]:
    """A field name's words: StudyInstanceUID, study_instance_uid and "Study UID" alike."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", field)
    return [w for w in re.split(r"[\s_.\-]+", spaced.lower()) if w]


def offered(
    facet: Facet, show: frozenset[str] = frozenset(), hide: frozenset[str] = frozenset()
) -> bool:
    """Whether a page's filter menus offer this field: named in `show`, yes; in `hide`, no;
    else not when its name's last word names a thing (ID_WORDS: ids, uids, hashes, paths,
    licences, split, `*_original`), it is free text (TEXT_FIELDS, or more than MAX_MENU distinct
    values) or an archive's own spelling of a normalised field (NORMALISED_SOURCES). `show` and
    `hide` hold field names compared as _words (case, "_" and spaces aside)."""
    words = _words(facet.field)
    key = " ".join(words)
    if key in {" ".join(_words(name)) for name in show}:
        return True
    if key in {" ".join(_words(name)) for name in hide}:
        return False
    if not words or words[-1] in ID_WORDS or facet.field in NORMALISED_SOURCES:
        return False
    if "_".join(words) in TEXT_FIELDS:
        return False
    return not (facet.kind == "values" and facet.distinct > MAX_MENU)
