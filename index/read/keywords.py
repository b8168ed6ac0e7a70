"""Keywords: full-text search over the reports (SQLite FTS5), what a report must (not) contain."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FilterError, IndexStoreError
from ..metadata import FTS_TOKENIZE
from .limits import MAX_KEYWORD_CHARS, MAX_KEYWORDS


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
    """FilterError, saying what is allowed, for keywords the report search cannot run (TypeError
    for anything but Keywords: the caller's mistake)."""
    if not isinstance(keywords, Keywords):
        raise TypeError(
            f"keywords must be index.read.keywords.Keywords, not {type(keywords).__name__}"
        )
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


# Keywords against the reports' words by status (index.write.sentences): a report "holds" a term it
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


class ReportTerms:
    """The report_terms FTS5 tables a version's reports are searched by (index.write.sentences):
    main's in a format-1 version, one per attached segment in a format-2 one, whose deleted ids
    (`deleted`: per schema, sorted) never match. FTS5 tables cannot be put behind a view, so
    every query runs per table and the ids are merged: as one table would answer (rowid order,
    the same LIMIT). Calls are serialised by the caller (one connection)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        schemas: tuple[str, ...] = ("main",),
        deleted: dict[str, np.ndarray] | None = None,
    ):
        self.conn, self.schemas = conn, schemas
        self.deleted = deleted or {}
        self._count: int | None = None

    def count(self) -> int:
        """Reports in the tables (the images with a sentence), deleted ones aside."""
        if self._count is None:
            total = 0
            for schema in self.schemas:
                total += self.conn.execute(
                    f"SELECT count(*) FROM {schema}.report_terms"
                ).fetchone()[0]
                gone = self.deleted.get(schema)
                if gone is not None and len(gone):
                    total -= len(self._query(schema, "", gone))
            self._count = total
        return self._count

    def matching(self, expression: str, limit: int | None = None) -> np.ndarray:
        """The sorted ids (at most `limit`, the lowest) whose report matches an FTS5 expression."""
        found = []
        for schema in self.schemas:
            gone = self.deleted.get(schema, np.zeros(0, np.int64))
            more = None if limit is None else limit + len(gone)
            rows = np.asarray(self._query(schema, expression, more=more), np.int64)
            if len(gone):
                rows = rows[~np.isin(rows, gone)]
            found.append(rows)
        every = np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
        return every if limit is None else every[:limit]

    def _query(
        self, schema: str, expression: str, among: np.ndarray | None = None, more: int | None = None
    ) -> list[int]:
        if among is not None:  # which of these ids the table holds
            held = []
            for start in range(0, len(among), 500):
                part = [int(i) for i in among[start : start + 500]]
                marks = ", ".join("?" * len(part))
                query = f"SELECT rowid FROM {schema}.report_terms WHERE rowid IN ({marks})"
                held += [row[0] for row in self.conn.execute(query, part)]
            return held
        query = f"SELECT rowid FROM {schema}.report_terms WHERE report_terms MATCH ?"
        if more is None:
            return [row[0] for row in self.conn.execute(query, (expression,))]
        return [row[0] for row in self.conn.execute(query + " LIMIT ?", (expression, more))]


def asserted_ids(terms: ReportTerms, keywords: Keywords) -> tuple[set[int] | None, set[int]]:
    """keyword_ids against what the reports assert (ASSERTED), in every table of `terms`."""
    _, column = ASSERTED
    must = None
    if keywords.must:
        expression = " AND ".join(column + phrase(term) for term in keywords.must)
        must = set(terms.matching(expression).tolist())
    must_not: set[int] = set()
    if keywords.must_not:
        expression = " OR ".join(column + phrase(term) for term in keywords.must_not)
        must_not = set(terms.matching(expression).tolist())
    return must, must_not


def narrowed(
    allowed: np.ndarray | None, must: set[int] | None, must_not: set[int], every: np.ndarray
) -> np.ndarray:
    """The sorted ids of `allowed` (None: `every` id of the version) that keyword_ids' `must`
    holds (None: no `must` term) and `must_not` does not."""
    if must is not None:
        must_ids = np.fromiter(must, dtype=np.int64, count=len(must))
        allowed = (
            np.unique(must_ids)
            if allowed is None
            else np.intersect1d(allowed, must_ids, assume_unique=True)
        )
    if allowed is None:
        allowed = np.asarray(every, dtype=np.int64)
    if must_not:
        drop = np.fromiter(must_not, dtype=np.int64, count=len(must_not))
        allowed = np.setdiff1d(allowed, drop, assume_unique=True)
    return allowed
