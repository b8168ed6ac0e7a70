"""Rows of meta.sqlite as the service reads them: an image's metadata, its other paths, its
thumbnail, the manifest fields a version holds and their values."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..metadata import COLUMNS


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


def thumbnail(conn: sqlite3.Connection, image_id: int) -> bytes | None:
    row = conn.execute("SELECT thumbnail FROM images WHERE id = ?", (image_id,)).fetchone()
    return None if row is None else bytes(row[0])


def meta_fields(conn: sqlite3.Connection) -> frozenset[str]:
    """The manifest fields present in a version: what filters may name besides the columns."""
    rows = conn.execute("SELECT DISTINCT key FROM images, json_each(images.meta)")
    return frozenset(row[0] for row in rows)


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
