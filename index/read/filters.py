"""The filter compiler: a search's filters (values, any-of lists, ranges) as SQL over meta.sqlite,
and the per-field tables that keep a filter on a manifest field from reading every row's JSON."""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from collections.abc import Mapping
from typing import Any

from ..errors import FilterError
from ..metadata import COLUMNS
from .limits import MAX_ANY_OF, RANGE_BOUNDS

log = logging.getLogger(__name__)

# Absolute server paths (path, source) and content hashes are kept out of the query surface:
# filtering on them would confirm what is on the server's disks. relpath is the archive's own name.
FILTER_COLUMNS = frozenset(COLUMNS) - {"meta", "report", "path", "source", "sha256"}
SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\- ]+$")
SCALARS = (str, int, float, bool)


def filter_sql(
    filters: Mapping[str, Any],
    fields: frozenset[str] | None = None,
    targets: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[str, list[Any]]:
    """WHERE clause for filters on columns or on manifest fields (the meta JSON).

    Each value is one of
        a scalar            {"modality": "CT"}                  equality
        a list of scalars   {"modality": ["CT", "MR"]}          any of them (SQL IN)
        a range             {"age": {"gte": 40, "lte": 60}}     either bound may be left out
    Numeric bounds compare numbers (values that are not numbers never match); text bounds compare
    text, which orders ISO dates. Manifest fields are stored as strings, so scalars and list
    items are compared with their str() there.

    `fields`: the manifest fields the index holds; any other name is refused, naming them, where
    it would only scan every row to find nothing. `targets`: for a manifest field, SQL that
    reads its value and its value as a number, in place of json_extract on the row's meta
    (FieldTables' columns). Anything the index cannot run: FilterError."""
    clauses, params = [], []
    for key, value in filters.items():
        target, target_params = _filter_target(key, fields)
        number = None
        if targets and key in targets:
            (target, number), target_params = targets[key], []
        clause, clause_params = _condition(
            key, value, target, target_params, key in FILTER_COLUMNS, number
        )
        clauses.append(clause)
        params += clause_params
    return " AND ".join(clauses) or "1", params


def _filter_target(key: str, fields: frozenset[str] | None) -> tuple[str, list[Any]]:
    """The SQL expression a filter on `key` reads, with its parameters."""
    if not isinstance(key, str):
        raise FilterError(f"filter field names are strings, not {type(key).__name__}")
    if key in FILTER_COLUMNS:
        return f"images.{key}", []
    if SAFE_KEY.match(key) and (fields is None or key in fields):
        return "json_extract(meta, ?)", [f'$."{key}"']
    known = sorted(FILTER_COLUMNS | (fields or frozenset()))
    raise FilterError(f"filter field {key!r} is not in this index; known: {', '.join(known)}")


def _condition(
    key: str,
    value: Any,
    target: str,
    target_params: list[Any],
    is_column: bool,
    number: str | None = None,
) -> tuple[str, list[Any]]:
    if isinstance(value, Mapping):
        return _range_condition(key, value, target, target_params, number)
    if isinstance(value, list | tuple):
        if not value:
            raise FilterError(
                f"filter {key!r}: the list of values is empty; give at least one value "
                "(a list means any of them)"
            )
        if len(value) > MAX_ANY_OF:
            raise FilterError(
                f"filter {key!r}: {len(value)} values; a list holds at most {MAX_ANY_OF}"
            )
        items = [_scalar(key, item, is_column, in_list=True) for item in value]
        marks = ", ".join("?" * len(items))
        return f"{target} IN ({marks})", [*target_params, *items]
    return f"{target} = ?", [*target_params, _scalar(key, value, is_column, in_list=False)]


def _scalar(key: str, value: Any, is_column: bool, in_list: bool) -> Any:
    """A value to compare for equality: as given for a column, its str() for a manifest field."""
    allowed = SCALARS if in_list else (*SCALARS, type(None))
    if not isinstance(value, allowed):
        where = "a list item" if in_list else "a value"
        raise FilterError(
            f"filter {key!r}: {where} is a string, number or boolean, not "
            f"{type(value).__name__}; a filter is a value, a list of values (any of them) or a "
            'range {"gte": low, "lte": high}'
        )
    if isinstance(value, str):
        _check_text(key, value)
    return value if is_column else str(value)


def _range_condition(
    key: str,
    bounds: Mapping[str, Any],
    target: str,
    target_params: list[Any],
    number: str | None = None,
) -> tuple[str, list[Any]]:
    """number: SQL for the target as a number (_number_sql of it), where one is stored."""
    unknown = sorted(str(name) for name in bounds if name not in RANGE_BOUNDS)
    if unknown or not bounds:
        what = f"has {', '.join(map(repr, unknown))}" if unknown else "is empty"
        raise FilterError(
            f'filter {key!r}: a range is {{"gte": low, "lte": high}} with one or both bounds '
            f"(inclusive), but this one {what}"
        )
    low, high = bounds.get("gte"), bounds.get("lte")
    kinds = {_bound_kind(key, name, bounds[name]) for name in ("gte", "lte") if name in bounds}
    if len(kinds) > 1:
        raise FilterError(
            f"filter {key!r}: the bounds are a number and a string; give two numbers (numeric "
            "comparison) or two strings (text comparison, e.g. ISO dates)"
        )
    numeric = kinds == {"number"}
    if low is not None and high is not None and low > high:
        raise FilterError(
            f"filter {key!r}: the range is empty (gte {low!r} is above lte {high!r}); "
            "give gte <= lte"
        )
    value, value_params = target, target_params
    if numeric:
        value, value_params = (number, []) if number else (_number_sql(target), target_params * 3)
    clauses, params = [], []
    for name, op in (("gte", ">="), ("lte", "<=")):
        if name in bounds:
            clauses.append(f"{value} {op} ?")
            params += [*value_params, float(bounds[name]) if numeric else bounds[name]]
    return "(" + " AND ".join(clauses) + ")", params


def _bound_kind(key: str, name: str, bound: Any) -> str:
    if isinstance(bound, int | float) and not isinstance(bound, bool):
        if not math.isfinite(bound):
            raise FilterError(f"filter {key!r}: {name} must be a finite number, not {bound!r}")
        return "number"
    if isinstance(bound, str):
        _check_text(key, bound)
        return "string"
    raise FilterError(
        f"filter {key!r}: {name} is a number or a string (e.g. an ISO date), not "
        f"{type(bound).__name__}"
    )


def _check_text(key: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FilterError(
            f"filter {key!r}: a value is not valid Unicode (a lone surrogate)"
        ) from None


def _number_sql(expr: str) -> str:
    """SQL for `expr` as a REAL when its text is a JSON number (40, -1.5, 2e3), else NULL.

    json_type() fails on text that is not JSON, so it only runs where json_valid() said yes
    (CASE evaluates lazily; AND may not). The expression appears three times: bind its
    parameters three times."""
    return (
        f"(CASE WHEN json_valid({expr}) THEN CASE WHEN json_type({expr}) IN ('integer', 'real') "
        f"THEN CAST({expr} AS REAL) END END)"
    )


class FieldTables:
    """Manifest fields copied out of the meta JSON into indexed tables: in a version written
    since issue 25, the tables it was published with (`stored`: field -> table, written by
    index/write/lookups.py with the same query as `_build`); before, temporary tables of one
    connection, a field the first time a filter names it.

    Without them a filter on a manifest field parses every row's JSON on every query, which
    grows with the archive (docs/benchmarks.md, "Filters at scale"). A field's table costs that
    scan once, then a filter reads its index: equality and any-of look values up, ranges read
    one column. The table holds exactly what json_extract returns (no declared type, so no
    conversion), so a filter matches the same rows either way. For a connection to an
    immutable version: the tables live in SQLite's temporary storage, never in the version's
    file. Not thread-safe, like the connection."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        stored: Mapping[str, str] | None = None,
        schema: str = "main",
    ):
        self.conn = conn
        self.schema = schema  # the database holding `images` and the stored tables (a segment)
        self.tables: dict[str, str] = {}
        self.stored = dict(stored or {})
        self.failed: dict[str, str] = {}  # field -> why its table could not be built

    def table_of(self, key: str) -> str:
        """The table (id, value, number) of manifest field `key`, qualified (main. or temp.):
        the stored one, else a temporary one built on first use. number is the value read as a
        number where it is one (_number_sql), as ranges compare.
        A build that fails (no room for temporary files) leaves nothing behind, is logged, and
        raises sqlite3.OperationalError, then and on every later call for that field (no build
        is tried again on this connection: each try would scan every row)."""
        if key in self.stored:
            return f"{self.schema}.{self.stored[key]}"
        if key in self.failed:
            raise sqlite3.OperationalError(self.failed[key])
        if key not in self.tables:
            prefix = "" if self.schema == "main" else f"{self.schema}_"
            name = f"filter_field_{prefix}{len(self.tables)}"
            try:
                self._build(name, key)
            except sqlite3.Error as err:
                self.conn.execute(f"DROP TABLE IF EXISTS temp.{name}")
                self.failed[key] = str(err)
                log.warning(
                    "filtering without field tables for %r (%s): every row's metadata is read",
                    key,
                    err,
                )
                raise sqlite3.OperationalError(str(err)) from err
            self.tables[key] = f"temp.{name}"
        return self.tables[key]

    def _build(self, name: str, key: str) -> None:
        self.conn.execute(f"CREATE TEMP TABLE {name} (id INTEGER PRIMARY KEY, value, number REAL)")
        self.conn.execute(
            f"INSERT INTO temp.{name} SELECT id, v, {_number_sql('v')} FROM "
            f"(SELECT id, json_extract(meta, ?) AS v FROM {self.schema}.images) WHERE v IS NOT NULL",
            (f'$."{key}"',),
        )
        for column in ("value", "number"):
            self.conn.execute(f"CREATE INDEX temp.{name}_{column} ON {name} ({column})")
        # statistics, so that a query filtering on two fields starts from the narrower one
        self.conn.execute(f"ANALYZE temp.{name}")


def filtered_ids(
    conn: sqlite3.Connection,
    filters: Mapping[str, Any],
    fields: frozenset[str] | None = None,
    tables: FieldTables | None = None,
    schema: str = "main",
) -> list[int]:
    """Ids of the images that pass every filter; `fields` as for filter_sql. With `tables`,
    manifest fields are read from their tables (joined: a missing value matches no filter,
    as json_extract's NULL does not); where one cannot be built, from the JSON as without.
    schema: the attached database whose images are read (a segment, index.read.segmented)."""
    where, params = filter_sql(filters, fields)  # a client error raises before any table build
    joins = ""
    if tables is not None:
        try:
            joins, targets = _field_joins(tables, [k for k in filters if k not in FILTER_COLUMNS])
        except sqlite3.OperationalError:  # logged once per field by FieldTables
            pass
        else:
            where, params = filter_sql(filters, fields, targets)
    try:
        rows = conn.execute(
            f"SELECT images.id FROM {schema}.images AS images{joins} WHERE {where}", params
        )
    except OverflowError as err:  # an integer SQLite cannot hold
        raise FilterError(
            f"filter value out of range: {err}; integers must fit in 64 bits"
        ) from None
    return [row[0] for row in rows]


def _field_joins(tables: FieldTables, keys: list[str]) -> tuple[str, dict[str, tuple[str, str]]]:
    """The JOIN clauses bringing in the tables of `keys`, and filter_sql's targets for them."""
    joins, targets = "", {}
    for n, key in enumerate(keys):
        alias = f"f{n}"
        joins += f" JOIN {tables.table_of(key)} AS {alias} ON {alias}.id = images.id"
        targets[key] = (f"{alias}.value", f"{alias}.number")
    return joins, targets
