"""What readers look up, written once when a version is published instead of on a server's first
query: at 10M rows, scanning every row's JSON for /v1/facets or for the first filter on a field
takes minutes, under the store's lock.

    field_tables   field -> the name of its table (NULL for a name no filter may use)
    field_N        one per manifest field: id INTEGER PRIMARY KEY, value, number REAL, with an
                   index on value and one on number (where it is a number): what a filter on the
                   field, a group look-up (every image of a study) reads
    facet_fields   the facets (index.read.facets.facets) in their order: field, kind, distinct,
                   low, high, images
    facet_values   their most frequent values (at most STORED_VALUES a field), ranked

A field table holds exactly what json_extract returns for the field (and the number a range
compares), the very query index.read.filters.FieldTables runs on versions written before these
tables, so a filter passes the same rows either way. The facets are those of the scan, stored.
Last, `check` runs SQLite's quick_check over the finished files: a server opening the version
reads headers and counts only (index/read/opening.py), so this is where every page is read.
"""

from __future__ import annotations

import sqlite3

from ..errors import IndexStoreError
from ..metadata import FACET_FIELDS, FACET_VALUES, FIELD_TABLES
from ..read.facets import Facet, facets
from ..read.filters import SAFE_KEY, _number_sql

STORED_VALUES = 1000  # a facet's values kept, most frequent first (a menu shows 50)


def write(conn: sqlite3.Connection) -> None:
    """The field tables and the facets of the rows in `conn` (a version being published)."""
    # every row's JSON parsed once: (field, id, value) of each value, by field; and the values a
    # facet does not count (JSON true, false, objects, arrays), which the tables hold
    conn.execute(
        "CREATE TEMP TABLE pairs AS SELECT j.key AS field, images.id AS id, j.value AS value, "
        "j.type IN ('text', 'integer', 'real', 'null') AS scalar "
        "FROM images, json_each(images.meta) AS j"
    )
    conn.execute("CREATE INDEX temp.pairs_field ON pairs (field, id)")
    conn.execute("CREATE TEMP TABLE uncounted AS SELECT field, id FROM pairs WHERE NOT scalar")
    fields = sorted(row[0] for row in conn.execute("SELECT DISTINCT field FROM temp.pairs"))
    conn.execute(f"CREATE TABLE {FIELD_TABLES} (field TEXT PRIMARY KEY, tab TEXT)")
    tables: dict[str, str | None] = {}
    for n, field in enumerate(fields):
        tables[field] = f"field_{n}" if SAFE_KEY.match(field) else None
        if tables[field] is not None:
            write_field_table(conn, tables[field], field)
        conn.execute(f"INSERT INTO {FIELD_TABLES} VALUES (?, ?)", (field, tables[field]))
    conn.execute("DROP TABLE temp.pairs")

    def counts(field: str) -> sqlite3.Cursor:
        """The scan's rows of one field (index.read.facets.facets), from its table's index."""
        return conn.execute(
            f"SELECT value, COUNT(*), {_number_sql('value')} FROM {tables[field]} "
            "WHERE value != '' AND id NOT IN (SELECT id FROM temp.uncounted WHERE field = ?) "
            "GROUP BY value",
            (field,),
        )

    write_facets(conn, facets(conn, frozenset(fields), counts))  # asks for safe names only
    conn.execute("DROP TABLE temp.uncounted")
    conn.commit()


def write_field_table(conn: sqlite3.Connection, table: str, field: str) -> None:
    """A field's values by image id: the value json_extract returns (json_each's, read in the
    same parse), and the value as a number where its text is a JSON number (as a range
    compares); rows without the field, or with a JSON null, are left out."""
    conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, value, number REAL)")
    conn.execute(
        f"INSERT INTO {table} SELECT id, value, {_number_sql('value')} FROM temp.pairs "
        "WHERE field = ? AND value IS NOT NULL ORDER BY id",
        (field,),
    )
    conn.execute(f"CREATE INDEX {table}_value ON {table} (value)")
    conn.execute(f"CREATE INDEX {table}_number ON {table} (number) WHERE number IS NOT NULL")
    conn.execute(f"ANALYZE {table}")  # a filter on two fields starts from the narrower one


def write_facets(conn: sqlite3.Connection, found: list[Facet]) -> None:
    conn.execute(
        f"CREATE TABLE {FACET_FIELDS} (position INTEGER PRIMARY KEY, field TEXT NOT NULL, "
        "kind TEXT NOT NULL, distinct_values INTEGER NOT NULL, low, high, images INTEGER NOT NULL)"
    )
    conn.execute(
        f"CREATE TABLE {FACET_VALUES} (position INTEGER NOT NULL, rank INTEGER NOT NULL, "
        "value TEXT NOT NULL, images INTEGER NOT NULL, PRIMARY KEY (position, rank)) WITHOUT ROWID"
    )
    for position, facet in enumerate(found):
        conn.execute(
            f"INSERT INTO {FACET_FIELDS} VALUES (?, ?, ?, ?, ?, ?, ?)",
            (position, facet.field, facet.kind, facet.distinct, facet.low, facet.high, facet.count),
        )
        conn.executemany(
            f"INSERT INTO {FACET_VALUES} VALUES (?, ?, ?, ?)",
            (
                (position, rank, value, n)
                for rank, (value, n) in enumerate(facet.values[:STORED_VALUES])
            ),
        )


def check(conn: sqlite3.Connection) -> None:
    """SQLite's quick_check of every page of meta.sqlite (and thumbs.sqlite where attached),
    before the version is published; IndexStoreError if it fails."""
    attached = {row[1] for row in conn.execute("PRAGMA database_list")}
    for schema in ("main", "thumbs"):
        if schema not in attached:
            continue
        found = [row[0] for row in conn.execute(f"PRAGMA {schema}.quick_check")]
        if found != ["ok"]:
            raise IndexStoreError(
                f"the {schema} metadata database just written fails SQLite's quick_check "
                f"({'; '.join(found[:3])}): nothing was published; check the disk and run again"
            )
