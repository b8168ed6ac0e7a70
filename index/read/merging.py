"""What several segments hold, merged into what one version holding their live images would hold:
the facets (summed from each segment's stored facets, the deleted rows' values taken off, no scan
of every row) and the report sentences (one space, each text once, in the order one build gives).

Used by index.read.segmented. Where a sum cannot be exact (a field that is a range in one segment
and a list of values in another, or a deleted row holding a range's bound), that one field is
counted from the rows instead (`scanned`). Two approximations remain, both documented in
SegmentedStore.facets: a range's `distinct` is the sum of the segments' (a value in two segments
counts twice), and a field whose stored values were cut (more than STORED_VALUES) sums the values
each segment kept.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import numpy as np

from .facets import FACET_COLUMNS, Facet, _count, _facet, is_placeholder, stored_facets
from .filters import _number_sql
from .sentences import SentenceSpace


def merged_facets(
    conn: sqlite3.Connection, schemas: Sequence[str], deleting: Sequence[str]
) -> list[Facet] | None:
    """The facets of the live rows of the segments attached as `schemas` (those in `deleting`
    hold some of temp.deleted's ids), or None where a segment was written before facets were
    stored (the caller counts them from the rows)."""
    stored = [stored_facets(conn, schema) for schema in schemas]
    if any(found is None for found in stored):
        return None
    by_field: dict[str, list[Facet]] = {}
    for found in stored:
        for facet in found or []:
            by_field.setdefault(facet.field, []).append(facet)
    gone = deleted_values(conn, deleting)
    names = [c for c in FACET_COLUMNS if c in by_field]
    names += sorted(name for name in by_field if name not in FACET_COLUMNS)
    merged = []
    for name in names:
        facet = merged_facet(conn, name, by_field[name], gone.get(name, {}))
        if facet is not None:
            merged.append(facet)
    return merged


def merged_facet(
    conn: sqlite3.Connection, name: str, parts: list[Facet], gone: dict[str, int]
) -> Facet | None:
    """One field's facet from its segments' (None: no live value left)."""
    kinds = {part.kind for part in parts}
    if kinds == {"values"}:
        counts: dict[str, int] = {}
        for part in parts:
            for value, n in part.values:
                counts[value] = counts.get(value, 0) + n
        for value, n in gone.items():
            if value in counts:
                counts[value] -= n
        counts = {value: n for value, n in counts.items() if n > 0}
        if not counts:
            return None
        if any(part.distinct > len(part.values) for part in parts):  # values were cut
            ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            total = sum(part.count for part in parts) - sum(gone.values())
            return Facet(name, "values", ranked, len(counts), count=total)
        # every value is known: the kind is decided again, as one build decides it
        return _facet(name, {value: [n, number_of(conn, value)] for value, n in counts.items()})
    if kinds == {"range"}:
        lows, highs = [part.low for part in parts], [part.high for part in parts]
        texts = {isinstance(bound, str) for bound in lows + highs}
        low, high = (min(lows), max(highs)) if len(texts) == 1 else (None, None)
        bounds = {low, high}
        on_bound = any(value in bounds or number_of(conn, value) in bounds for value in gone)
        if low is not None and not on_bound:
            total = sum(part.count for part in parts) - sum(gone.values())
            distinct = sum(part.distinct for part in parts)
            return Facet(name, "range", [], distinct, low, high, total) if total > 0 else None
    return scanned(conn, name)


def scanned(conn: sqlite3.Connection, name: str) -> Facet | None:
    """One field's facet counted from every live row (the `images` view): where a sum of the
    segments' stored facets cannot be exact."""
    if name in FACET_COLUMNS:
        rows = conn.execute(
            f"SELECT {name}, COUNT(*), {_number_sql(name)} FROM images "
            f"WHERE {name} IS NOT NULL AND {name} != '' GROUP BY {name}"
        )
    else:
        rows = conn.execute(
            f"SELECT j.value, COUNT(*), {_number_sql('j.value')} "
            "FROM images, json_each(images.meta) AS j WHERE j.key = ? "
            "AND j.type IN ('text', 'integer', 'real') AND j.value != '' GROUP BY j.value",
            (name,),
        )
    values: dict[str, list] = {}
    _count(values, rows)
    return _facet(name, values) if values else None


def deleted_values(conn: sqlite3.Connection, schemas: Sequence[str]) -> dict[str, dict[str, int]]:
    """field -> value -> deleted rows holding it, as the facets count values (placeholders,
    blanks and JSON that is not text or a number left out); reads the deleted rows only."""
    gone: dict[str, dict[str, int]] = {}

    def add(field: str, value: object) -> None:
        if value is None or value == "" or is_placeholder(value):
            return
        counts = gone.setdefault(field, {})
        counts[str(value)] = counts.get(str(value), 0) + 1

    for schema in schemas:
        deleted = f"SELECT id FROM temp.{DELETED_TABLE}"
        for row in conn.execute(
            f"SELECT {', '.join(FACET_COLUMNS)} FROM {schema}.images WHERE id IN ({deleted})"
        ):
            for column, value in zip(FACET_COLUMNS, row, strict=True):
                add(column, value)
        for key, value in conn.execute(
            f"SELECT j.key, j.value FROM {schema}.images AS i, json_each(i.meta) AS j "
            f"WHERE i.id IN ({deleted}) AND j.type IN ('text', 'integer', 'real') "
            "AND j.value != ''"
        ):
            add(key, value)
    return gone


def number_of(conn: sqlite3.Connection, text: str) -> float | None:
    """A value's text as the number a facet counts it as (a JSON number), else None."""
    return conn.execute(f"SELECT {_number_sql('?')}", (text, text, text)).fetchone()[0]


DELETED_TABLE = "deleted"  # temp.deleted (id INTEGER PRIMARY KEY): the ids a version drops


def merged_sentences(
    conn: sqlite3.Connection,
    schemas: Sequence[str],
    vectors: Sequence[np.ndarray],
    deleted: Sequence[np.ndarray],
) -> SentenceSpace:
    """One sentence space from the segments' (attached as `schemas`, their sentence vectors,
    their deleted ids): a sentence only deleted images hold is left out, a text held by several
    segments kept once, and the sentences ordered as one build orders them (by the first live
    image whose report holds them, then by their place in that report, which is their order in
    its segment except after deletions)."""
    chosen: dict[str, tuple[int, int, int]] = {}  # text -> (first image, segment, sentence)
    links: list[tuple[int, np.ndarray]] = []  # per segment: (sentence, image) pairs kept
    rows: list[list[tuple]] = []
    for n, schema in enumerate(schemas):
        pairs = np.asarray(
            conn.execute(f"SELECT sentence, image FROM {schema}.sentence_images").fetchall(),
            np.int64,
        ).reshape(-1, 2)
        pairs = pairs[~np.isin(pairs[:, 1], deleted[n])]
        held = conn.execute(
            f"SELECT id, text, mentions, asserts, denies, sides FROM {schema}.sentences ORDER BY id"
        ).fetchall()
        first = np.full(len(held), np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, pairs[:, 0], pairs[:, 1])
        for sentence in np.flatnonzero(first < np.iinfo(np.int64).max).tolist():
            key = (int(first[sentence]), n, sentence)
            text = held[sentence][1]
            if text not in chosen or key < chosen[text]:
                chosen[text] = key
        links.append((n, pairs))
        rows.append(held)
    order = sorted(chosen.values())
    by_text = {rows[n][sentence][1]: i for i, (_, n, sentence) in enumerate(order)}
    dim = vectors[0].shape[1] if len(vectors) else 0
    space_vectors = np.zeros((len(order), dim), np.float32)
    space_rows = []
    for i, (_, n, sentence) in enumerate(order):
        space_vectors[i] = vectors[n][sentence]
        space_rows.append((i, *rows[n][sentence][1:]))
    pairs_kept = []
    for n, pairs in links:
        to_new = np.array([by_text.get(row[1], -1) for row in rows[n]])
        if len(pairs):
            pairs_kept.append(np.column_stack([to_new[pairs[:, 0]], pairs[:, 1]]))
    every = np.concatenate(pairs_kept) if pairs_kept else np.zeros((0, 2), np.int64)
    every = every[np.lexsort((every[:, 1], every[:, 0]))]
    return SentenceSpace.assembled(space_vectors, space_rows, every.tolist())
