"""Image metadata in SQLite (stdlib sqlite3): one row per indexed image, keyed by its FAISS id.

The id is the first 63 bits of the content hash, so it is the same in every version, every shard
and every rebuild of the same file: ids survive add/remove/merge and are what clients keep.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import FilterError, IndexStoreError

log = logging.getLogger(__name__)
META_DB = "meta.sqlite"
ID_MASK = 0x7FFF_FFFF_FFFF_FFFF  # SQLite and FAISS ids are signed 64-bit: keep them positive

SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    relpath TEXT NOT NULL,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    size_bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    modality TEXT,
    view TEXT,
    report TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{}',
    thumbnail BLOB NOT NULL
);
CREATE INDEX images_modality ON images (modality);
CREATE INDEX images_view ON images (view);
CREATE TABLE duplicates (
    path TEXT NOT NULL,
    id INTEGER NOT NULL,
    duplicate_of TEXT NOT NULL
);
CREATE INDEX duplicates_path ON duplicates (path);
CREATE INDEX duplicates_id ON duplicates (id);
"""
COLUMNS = (
    "id",
    "path",
    "relpath",
    "source",
    "sha256",
    "size_bytes",
    "width",
    "height",
    "modality",
    "view",
    "report",
    "meta",
)
# Absolute server paths (path, source) and content hashes are kept out of the query surface:
# filtering on them would confirm what is on the server's disks. relpath is the archive's own name.
FILTER_COLUMNS = frozenset(COLUMNS) - {"meta", "report", "path", "source", "sha256"}
SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\- ]+$")
SCALARS = (str, int, float, bool)
RANGE_BOUNDS = ("gte", "lte")
MAX_ANY_OF = 1000  # values in one any-of list: far above real use, below SQLite's variable limit
MAX_KEYWORDS = 16
MAX_KEYWORD_CHARS = 200
FTS_TOKENIZE = "porter unicode61"  # case-folded, diacritics removed, Porter-stemmed English
FACET_COLUMNS = ("modality", "view")


def content_id(sha256_hex: str) -> int:
    return int(sha256_hex[:16], 16) & ID_MASK


@dataclass
class ImageRow:
    """One image as stored, without its thumbnail."""

    id: int
    path: str
    relpath: str
    source: str
    sha256: str
    size_bytes: int
    width: int
    height: int
    modality: str | None
    view: str | None
    report: str
    meta: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def create(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    return conn


def open_readonly(path: Path) -> sqlite3.Connection:
    """Published versions never change: immutable read-only access, shareable across threads."""
    if not path.is_file():
        raise IndexStoreError(f"{path} is missing: the index version is incomplete, rebuild it")
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def insert_rows(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Rows in COLUMNS order followed by the thumbnail bytes."""
    marks = ", ".join("?" * (len(COLUMNS) + 1))
    conn.executemany(f"INSERT INTO images VALUES ({marks})", rows)


def insert_duplicates(conn: sqlite3.Connection, rows: Iterable[tuple[str, int, str]]) -> None:
    conn.executemany("INSERT INTO duplicates VALUES (?, ?, ?)", rows)


def copy_from(
    conn: sqlite3.Connection,
    other: Path,
    image_ids: Iterable[int] | None = None,
    duplicate_ids: Iterable[int] | None = None,
) -> None:
    """Copy images (with thumbnails) and duplicates of another meta.sqlite; None copies all."""
    conn.execute("ATTACH DATABASE ? AS other", (str(other),))
    try:
        _copy_table(conn, "images", image_ids)
        _copy_table(conn, "duplicates", duplicate_ids)
        if _has_table(conn, "other", NOT_INDEXED):  # written by remote sources (DICOMweb) only
            _create_not_indexed(conn)
            conn.execute(f"INSERT OR REPLACE INTO {NOT_INDEXED} SELECT * FROM other.{NOT_INDEXED}")
        conn.commit()
    finally:
        conn.execute("DETACH DATABASE other")


def _copy_table(conn: sqlite3.Connection, table: str, ids: Iterable[int] | None) -> None:
    if ids is None:
        conn.execute(f"INSERT INTO {table} SELECT * FROM other.{table}")
        return
    conn.execute("CREATE TEMP TABLE keep (id INTEGER PRIMARY KEY)")
    conn.executemany("INSERT OR IGNORE INTO temp.keep VALUES (?)", ((int(i),) for i in ids))
    conn.execute(f"INSERT INTO {table} SELECT * FROM other.{table} WHERE id IN temp.keep")
    conn.execute("DROP TABLE temp.keep")


def hashes_and_paths(conn: sqlite3.Connection) -> dict[str, tuple[int, str]]:
    """sha256 -> (id, path) of every image."""
    return {sha: (i, path) for i, sha, path in conn.execute("SELECT id, sha256, path FROM images")}


def ids_for_path(conn: sqlite3.Connection, path: str) -> list[int]:
    """Ids of images stored under `path` (absolute or relative to its source)."""
    rows = conn.execute("SELECT id FROM images WHERE path = ? OR relpath = ?", (path, path))
    return sorted({row[0] for row in rows})


def sorted_ids(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM images ORDER BY id")]


def image_names(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    """(id, relpath, path) of every image."""
    return conn.execute("SELECT id, relpath, path FROM images").fetchall()


def is_duplicate_path(conn: sqlite3.Connection, path: str) -> bool:
    return conn.execute("SELECT 1 FROM duplicates WHERE path = ?", (path,)).fetchone() is not None


def forget_duplicate_paths(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    conn.executemany("DELETE FROM duplicates WHERE path = ?", [(p,) for p in paths])


def settle_duplicates(conn: sqlite3.Connection) -> None:
    """Point every duplicate at the path kept for its content; drop self-references, entries whose
    content is not indexed and repeated paths."""
    conn.execute(
        "UPDATE duplicates SET duplicate_of = "
        "(SELECT path FROM images WHERE images.id = duplicates.id)"
    )
    conn.execute("DELETE FROM duplicates WHERE path = duplicate_of OR duplicate_of IS NULL")
    conn.execute(
        "DELETE FROM duplicates "
        "WHERE rowid NOT IN (SELECT min(rowid) FROM duplicates GROUP BY path)"
    )
    conn.commit()


def duplicate_entries(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every duplicate (settled first), by path: {path, id, duplicate_of}."""
    settle_duplicates(conn)
    rows = conn.execute("SELECT path, id, duplicate_of FROM duplicates ORDER BY path")
    return [{"path": p, "id": i, "duplicate_of": d} for p, i, d in rows]


# -- what a remote source saw but did not index (DICOMweb: reports, instances without pixels) ------

NOT_INDEXED = "not_indexed"


def _has_table(conn: sqlite3.Connection, schema: str, table: str) -> bool:
    query = f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?"
    return conn.execute(query, (table,)).fetchone() is not None


def _create_not_indexed(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {NOT_INDEXED} (path TEXT PRIMARY KEY, reason TEXT NOT NULL)"
    )


def record_not_indexed(conn: sqlite3.Connection, rows: Iterable[tuple[str, str]]) -> None:
    """(path, reason) of things a source holds that are not images of the index, so that a later
    sync knows them without fetching them again."""
    _create_not_indexed(conn)
    conn.executemany(f"INSERT OR REPLACE INTO {NOT_INDEXED} VALUES (?, ?)", rows)


def forget_not_indexed(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    if _has_table(conn, "main", NOT_INDEXED):
        conn.executemany(f"DELETE FROM {NOT_INDEXED} WHERE path = ?", [(p,) for p in paths])


def _under(prefix: str) -> tuple[str, list[Any]]:
    """SQL (and its parameters) for "path starts with prefix" that reads the path index: a
    range from prefix to its successor (the last character one higher), then the exact test."""
    clause, params = "path >= ?", [prefix]
    last = ord(prefix[-1]) + 1 if prefix else None
    if last is not None and last <= 0x10FFFF and not 0xD800 <= last <= 0xDFFF:
        clause, params = clause + " AND path < ?", [*params, prefix[:-1] + chr(last)]
    return clause + " AND substr(path, 1, ?) = ?", [*params, len(prefix), prefix]


def paths_under(conn: sqlite3.Connection, prefix: str) -> tuple[dict[str, int], dict[str, str]]:
    """({path: id} of the images, {path: reason} of what was not indexed) whose path starts with
    prefix (a remote source's URL)."""
    start, params = _under(prefix)
    images = {
        path: image_id
        for image_id, path in conn.execute(f"SELECT id, path FROM images WHERE {start}", params)
    }
    seen: dict[str, str] = {}
    if _has_table(conn, "main", NOT_INDEXED):
        query = f"SELECT path, reason FROM {NOT_INDEXED} WHERE {start}"
        seen = dict(conn.execute(query, params))
    return images, seen


def report_under(conn: sqlite3.Connection, prefix: str) -> str:
    """The report of an image whose path starts with prefix (a study's URL), or ''."""
    start, params = _under(prefix)
    row = conn.execute(
        f"SELECT report FROM images WHERE {start} AND report != '' LIMIT 1", params
    ).fetchone()
    return row[0] if row else ""


def values_under(conn: sqlite3.Connection, prefix: str, key: str) -> set[str]:
    """The non-empty values of metadata field `key` among the images whose path starts with
    prefix."""
    start, params = _under(prefix)
    rows = conn.execute(
        f"SELECT DISTINCT json_extract(meta, ?) FROM images WHERE {start}",
        [f'$."{key}"', *params],
    )
    return {str(value) for (value,) in rows if value not in (None, "")}


def fill_reports_under(conn: sqlite3.Connection, prefix: str, report: str) -> int:
    """Give the images under prefix (a study's URL) that have no report this one; how many."""
    start, params = _under(prefix)
    done = conn.execute(
        f"UPDATE images SET report = ? WHERE {start} AND report = ''", [report, *params]
    )
    return done.rowcount


def row_from_sql(values: tuple) -> ImageRow:
    fields = dict(zip(COLUMNS, values, strict=True))
    fields["meta"] = json.loads(fields["meta"] or "{}")
    return ImageRow(**fields)


def get_rows(conn: sqlite3.Connection, ids: list[int]) -> dict[int, ImageRow]:
    found: dict[int, ImageRow] = {}
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ", ".join("?" * len(part))
        query = f"SELECT {', '.join(COLUMNS)} FROM images WHERE id IN ({marks})"
        for values in conn.execute(query, part):
            row = row_from_sql(values)
            found[row.id] = row
    return found


def duplicate_paths(conn: sqlite3.Connection, image_id: int) -> list[str]:
    rows = conn.execute("SELECT path FROM duplicates WHERE id = ? ORDER BY path", (image_id,))
    return [row[0] for row in rows]


def thumbnail(conn: sqlite3.Connection, image_id: int) -> bytes | None:
    row = conn.execute("SELECT thumbnail FROM images WHERE id = ?", (image_id,)).fetchone()
    return None if row is None else bytes(row[0])


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
    """Manifest fields copied out of the meta JSON into indexed temporary tables of one
    connection, a field the first time a filter names it.

    Without them a filter on a manifest field parses every row's JSON on every query, which
    grows with the archive (docs/benchmarks.md, "Filters at scale"). A field's table costs that
    scan once, then a filter reads its index: equality and any-of look values up, ranges read
    one column. The table holds exactly what json_extract returns (no declared type, so no
    conversion), so a filter matches the same rows either way. For a connection to an
    immutable version: the tables live in SQLite's temporary storage, never in the version's
    file. Not thread-safe, like the connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.tables: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # field -> why its table could not be built

    def table_of(self, key: str) -> str:
        """The temporary table (id, value, number) of manifest field `key`, built on first use:
        number is the value read as a number where it is one (_number_sql), as ranges compare.
        A build that fails (no room for temporary files) leaves nothing behind, is logged, and
        raises sqlite3.OperationalError, then and on every later call for that field (no build
        is tried again on this connection: each try would scan every row)."""
        if key in self.failed:
            raise sqlite3.OperationalError(self.failed[key])
        if key not in self.tables:
            name = f"filter_field_{len(self.tables)}"
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
            self.tables[key] = name
        return self.tables[key]

    def _build(self, name: str, key: str) -> None:
        self.conn.execute(f"CREATE TEMP TABLE {name} (id INTEGER PRIMARY KEY, value, number REAL)")
        self.conn.execute(
            f"INSERT INTO temp.{name} SELECT id, v, {_number_sql('v')} FROM "
            "(SELECT id, json_extract(meta, ?) AS v FROM images) WHERE v IS NOT NULL",
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
) -> list[int]:
    """Ids of the images that pass every filter; `fields` as for filter_sql. With `tables`,
    manifest fields are read from their tables (joined: a missing value matches no filter,
    as json_extract's NULL does not); where one cannot be built, from the JSON as without."""
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
        rows = conn.execute(f"SELECT images.id FROM images{joins} WHERE {where}", params)
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
        joins += f" JOIN temp.{tables.table_of(key)} AS {alias} ON {alias}.id = images.id"
        targets[key] = (f"{alias}.value", f"{alias}.number")
    return joins, targets


# -- keywords: full-text search over the reports ----------------------------------------------------


@dataclass(frozen=True)
class Keywords:
    """Words or phrases an image's report must contain (all of `must`) and must not contain (any
    of `must_not`). Case-insensitive, stemmed ("effusion" also finds "effusions"); each term is
    searched as one phrase, so quotes, * or NEAR( in a term are only text, never query syntax.
    A bare string is one term. Checked when a search runs (check_keywords): blank, overlong or
    too many terms raise FilterError there, with the other client errors."""

    must: tuple[str, ...] = ()
    must_not: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("must", "must_not"):
            terms = getattr(self, name)
            if isinstance(terms, str):
                object.__setattr__(self, name, (terms,))
            elif isinstance(terms, Iterable) and not isinstance(terms, tuple):
                object.__setattr__(self, name, tuple(terms))

    def __bool__(self) -> bool:
        return bool(self.must or self.must_not)


def check_keywords(keywords: Keywords) -> None:
    """FilterError, saying what is allowed, for keywords the report search cannot run."""
    for name in ("must", "must_not"):
        terms = getattr(keywords, name)
        if not isinstance(terms, tuple):
            raise FilterError(f"keywords {name} is a list of words or phrases")
        for term in terms:
            check_keyword(name, term)
    total = len(keywords.must) + len(keywords.must_not)
    if total > MAX_KEYWORDS:
        raise FilterError(
            f"{total} keywords: at most {MAX_KEYWORDS} terms (must and must_not together)"
        )


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline, return are spaces


def check_keyword(name: str, term: Any) -> None:
    if not isinstance(term, str):
        raise FilterError(f"keywords {name}: a term is a string, not {type(term).__name__}")
    if not term.strip():
        raise FilterError(f"keywords {name}: a term is blank; give a word or a phrase")
    if len(term) > MAX_KEYWORD_CHARS:
        raise FilterError(
            f"keywords {name}: a term of {len(term)} characters; at most {MAX_KEYWORD_CHARS}"
        )
    try:
        term.encode("utf-8")
    except UnicodeEncodeError:
        raise FilterError(f"keywords {name}: {term!r} is not valid Unicode") from None
    if CONTROL.search(term):
        raise FilterError(
            f"keywords {name}: {term!r} holds a control character (NUL, ESC...); send the words"
        )
    if not any(char.isalnum() for char in term):
        raise FilterError(
            f"keywords {name}: {term!r} has no letter or digit; the search matches words"
        )


def reports(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """(id, report) of every image with a report."""
    return conn.execute("SELECT id, report FROM images WHERE report != ''").fetchall()


def report_index(rows: Iterable[tuple[int, str]]) -> sqlite3.Connection:
    """An in-memory FTS5 index of (id, report) rows, rowid = image id.

    Published versions are read-only, so it lives in a private connection; the caller keeps it
    for the life of the store and serialises its use (check_same_thread is off)."""
    fts = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        fts.execute(
            "CREATE VIRTUAL TABLE reports USING fts5(report, content='', columnsize=0, "
            f"tokenize='{FTS_TOKENIZE}')"
        )
    except sqlite3.OperationalError as err:
        fts.close()
        raise IndexStoreError(
            f"keyword search needs SQLite's FTS5, which this Python's sqlite3 lacks ({err}): "
            "run the service on a Python whose SQLite has FTS5 (CPython's builds do)"
        ) from err
    fts.executemany("INSERT INTO reports (rowid, report) VALUES (?, ?)", rows)
    fts.execute("INSERT INTO reports (reports) VALUES ('optimize')")
    fts.commit()
    return fts


def phrase(term: str) -> str:
    """A term as one FTS5 phrase: inside double quotes, inner quotes doubled, so no character of
    it is query syntax."""
    return '"' + term.replace('"', '""') + '"'


# Keywords against the reports' words by status (index.sentences): a report "holds" a term it
# asserts as present; "No effusion." neither satisfies `must: effusion` nor fails `must_not`.
ASSERTED = ("report_terms", "{present} : ")
MENTIONED = ("reports", "")  # the in-memory index of versions written before report sentences


def keyword_ids(
    fts: sqlite3.Connection, keywords: Keywords, table: tuple[str, str] = MENTIONED
) -> tuple[set[int] | None, set[int]]:
    """(ids whose report holds every `must` term, None when there is none; ids whose report
    holds any `must_not` term)."""
    name, column = table
    query = f"SELECT rowid FROM {name} WHERE {name} MATCH ?"
    must = None
    if keywords.must:
        expression = " AND ".join(column + phrase(term) for term in keywords.must)
        must = {row[0] for row in fts.execute(query, (expression,))}
    must_not: set[int] = set()
    if keywords.must_not:
        expression = " OR ".join(column + phrase(term) for term in keywords.must_not)
        must_not = {row[0] for row in fts.execute(query, (expression,))}
    return must, must_not


def meta_fields(conn: sqlite3.Connection) -> frozenset[str]:
    """The manifest fields present in a version: what filters may name besides the columns."""
    rows = conn.execute("SELECT DISTINCT key FROM images, json_each(images.meta)")
    return frozenset(row[0] for row in rows)


# -- facets: what the filters can ask for -----------------------------------------------------------


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


def field_values(conn: sqlite3.Connection, field: str) -> dict[str, list[int]]:
    """value -> ids of the images whose manifest field `field` holds it (non-empty values only)."""
    path = f'$."{field}"'
    rows = conn.execute(
        "SELECT id, json_extract(meta, ?) FROM images WHERE json_extract(meta, ?) != ''",
        (path, path),
    )
    found: dict[str, list[int]] = {}
    for image_id, value in rows:
        found.setdefault(str(value), []).append(image_id)
    return found
