"""Rows of meta.sqlite as the service reads them: an image's metadata, its other paths, its
thumbnail, the manifest fields a version holds and their values."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..metadata import COLUMNS, FIELD_TABLES, has_table


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


def thumbnail(conn: sqlite3.Connection, image_id: int, apart: bool = True) -> bytes | None:
    """apart: the thumbnails are in thumbs.sqlite, attached as `thumbs` (index.metadata);
    else in images.thumbnail (versions written before issue 25)."""
    query = (
        "SELECT jpeg FROM thumbs.thumbnails WHERE id = ?"
        if apart
        else "SELECT thumbnail FROM images WHERE id = ?"
    )
    row = conn.execute(query, (image_id,)).fetchone()
    return None if row is None else bytes(row[0])


def meta_fields(conn: sqlite3.Connection) -> frozenset[str]:
    """The manifest fields present in a version: what filters may name besides the columns.
    Read from the field_tables a version is published with, or, written before them, from
    every row."""
    if has_table(conn, FIELD_TABLES):
        return frozenset(row[0] for row in conn.execute(f"SELECT field FROM {FIELD_TABLES}"))
    rows = conn.execute("SELECT DISTINCT key FROM images, json_each(images.meta)")
    return frozenset(row[0] for row in rows)


def stored_tables(conn: sqlite3.Connection) -> dict[str, str] | None:
    """Manifest field -> its table written at publish (index/write/lookups.py), or None in a
    version written before them."""
    if not has_table(conn, FIELD_TABLES):
        return None
    query = f"SELECT field, tab FROM {FIELD_TABLES} WHERE tab IS NOT NULL"
    return dict(conn.execute(query).fetchall())


def members(conn: sqlite3.Connection, table: str, keys: list[str]) -> dict[str, list[int]]:
    """key -> ids of the images whose field (its table, index/write/lookups.py) holds it, as
    str(): a look-up of each key on the table's value index, not a scan. A key is also looked
    up as the integer or real it spells, as json_extract returns a JSON number."""
    wanted: dict[object, str] = {}
    for key in keys:
        wanted[key] = key
        for kind in (int, float):
            try:
                number = kind(key)
            except ValueError:
                continue
            if str(number) == key:
                wanted[number] = key
    found: dict[str, list[int]] = {}
    asked, values = set(keys), list(wanted)
    for start in range(0, len(values), 500):
        part = values[start : start + 500]
        marks = ", ".join("?" * len(part))
        query = f"SELECT value, id FROM {table} WHERE value IN ({marks}) ORDER BY id"
        for value, image_id in conn.execute(query, part):
            if value != "" and str(value) in asked:
                found.setdefault(str(value), []).append(image_id)
    return {key: sorted(ids) for key, ids in found.items()}


def field_values(conn: sqlite3.Connection, field: str) -> dict[str, list[int]]:
    """value -> ids of the images whose manifest field `field` holds it (non-empty values only)."""
    path = f'$."{field}"'
    rows = conn.execute(
        "SELECT id, json_extract(meta, ?) FROM images WHERE json_extract(meta, ?) != '' "
        "ORDER BY id",
        (path, path),
    )
    found: dict[str, list[int]] = {}
    for image_id, value in rows:
        found.setdefault(str(value), []).append(image_id)
    return found
