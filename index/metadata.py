"""The schema of a version's meta.sqlite, and what both rooms read of it (index.read, index.write).

One row per indexed image, keyed by its FAISS id. The id is the first 63 bits of the content hash,
so it is the same in every version, every shard and every rebuild of the same file: ids survive
add/remove/merge and are what clients keep. Versions written since issue 25 keep the JPEG
thumbnails in thumbs.sqlite beside it (THUMBS_DB), so that the file a server opens and checks
holds only what filters and rows read; older versions hold them in images.thumbnail and keep
serving. Reads for serving are in index/read/ (rows, filters, keywords, facets); writes in
index/write/rows.py, and the lookup tables written at publish in index/write/lookups.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
    meta TEXT NOT NULL DEFAULT '{}'
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
THUMBS_DB = "thumbs.sqlite"  # the thumbnails of a version, apart from meta.sqlite
THUMBS_SCHEMA = "CREATE TABLE thumbs.thumbnails (id INTEGER PRIMARY KEY, jpeg BLOB NOT NULL)"
# written at publish (index/write/lookups.py) so that no reader scans every row: the manifest
# fields with each one's indexed table (id, value, number), and the facets with their top values
FIELD_TABLES = "field_tables"
FACET_FIELDS = "facet_fields"
FACET_VALUES = "facet_values"
FTS_TOKENIZE = "porter unicode61"  # case-folded, diacritics removed, Porter-stemmed English
# the sides a report sentence names, as bits of the sentences table's `sides` column
SIDE_BITS = {"left": 1, "right": 2}


def content_id(sha256_hex: str) -> int:
    return int(sha256_hex[:16], 16) & ID_MASK


def open_readonly(path: Path) -> sqlite3.Connection:
    """Published versions never change: immutable read-only access, shareable across threads."""
    if not path.is_file():
        raise IndexStoreError(f"{path} is missing: the index version is incomplete, rebuild it")
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def attach_thumbnails(conn: sqlite3.Connection, path: Path) -> None:
    """Attach a published thumbs.sqlite (read-only, immutable) to a connection as `thumbs`."""
    if not path.is_file():
        raise IndexStoreError(f"{path} is missing: the index version is incomplete, rebuild it")
    conn.execute("ATTACH DATABASE ? AS thumbs", (f"file:{path}?mode=ro&immutable=1",))


def has_column(conn: sqlite3.Connection, table: str, column: str, schema: str = "main") -> bool:
    return any(row[1] == column for row in conn.execute(f"PRAGMA {schema}.table_info({table})"))


def has_table(conn: sqlite3.Connection, table: str, schema: str = "main") -> bool:
    query = f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?"
    return conn.execute(query, (table,)).fetchone() is not None


def reports(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """(id, report) of every image with a report."""
    return conn.execute("SELECT id, report FROM images WHERE report != ''").fetchall()
