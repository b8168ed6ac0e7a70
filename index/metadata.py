"""Image metadata in SQLite (stdlib sqlite3): one row per indexed image, keyed by its FAISS id.

The id is the first 63 bits of the content hash, so it is the same in every version, every shard
and every rebuild of the same file: ids survive add/remove/merge and are what clients keep.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IndexStoreError

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
    filters: Mapping[str, Any], fields: frozenset[str] | None = None
) -> tuple[str, list[Any]]:
    """WHERE clause for equality filters on columns or on manifest fields (the meta JSON).

    `fields`: the manifest fields the index holds; any other name is refused, naming them, where
    it would only scan every row to find nothing."""
    clauses, params = [], []
    for key, value in filters.items():
        if key in FILTER_COLUMNS:
            clauses.append(f"{key} = ?")
            params.append(value)
        elif SAFE_KEY.match(key) and (fields is None or key in fields):
            clauses.append("json_extract(meta, ?) = ?")
            params += [f'$."{key}"', str(value)]  # manifest fields are stored as strings
        else:
            known = sorted(FILTER_COLUMNS | (fields or frozenset()))
            raise ValueError(
                f"filter field {key!r} is not in this index; known: {', '.join(known)}"
            )
    return " AND ".join(clauses) or "1", params


def filtered_ids(
    conn: sqlite3.Connection, filters: Mapping[str, Any], fields: frozenset[str] | None = None
) -> list[int]:
    """Ids of the images that pass every filter; `fields` as for filter_sql."""
    where, params = filter_sql(filters, fields)
    try:
        rows = conn.execute(f"SELECT id FROM images WHERE {where}", params)
    except OverflowError as err:  # an integer SQLite cannot hold
        raise ValueError(f"filter value out of range: {err}") from None
    return [row[0] for row in rows]


def meta_fields(conn: sqlite3.Connection) -> frozenset[str]:
    """The manifest fields present in a version: what filters may name besides the columns."""
    rows = conn.execute("SELECT DISTINCT key FROM images, json_each(images.meta)")
    return frozenset(row[0] for row in rows)
