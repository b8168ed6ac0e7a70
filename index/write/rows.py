"""Writing meta.sqlite: image rows from the staging area, duplicates, what a remote source saw but
did not index, and the copies add/remove/merge make of an earlier version's rows."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..fields import with_derived
from ..metadata import COLUMNS, SCHEMA, THUMBS_DB, THUMBS_SCHEMA, content_id, has_column

if TYPE_CHECKING:  # only named in annotations: reading rows needs neither torch nor a source
    from convirt.imagerecord import ImageRecord
    from convirt.manifest import ManifestItem

    from ..sources.base import Source
    from ..version import VersionFiles
    from .embedding import JobResult
    from .staging import Staging


def create(path: Path) -> sqlite3.Connection:
    """A new meta.sqlite, with the version's thumbs.sqlite beside it attached as `thumbs`."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.execute("ATTACH DATABASE ? AS thumbs", (str(Path(path).parent / THUMBS_DB),))
    conn.execute(THUMBS_SCHEMA)
    return conn


def insert_rows(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Rows in COLUMNS order followed by the thumbnail bytes (which go to thumbs.sqlite)."""
    marks = ", ".join("?" * len(COLUMNS))
    for batch in _batches(rows, 1000):
        conn.executemany(f"INSERT INTO images VALUES ({marks})", (row[:-1] for row in batch))
        conn.executemany(
            "INSERT INTO thumbs.thumbnails VALUES (?, ?)", ((row[0], row[-1]) for row in batch)
        )


def _batches(rows: Iterable[tuple], size: int) -> Iterable[list[tuple]]:
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def insert_duplicates(conn: sqlite3.Connection, rows: Iterable[tuple[str, int, str]]) -> None:
    conn.executemany("INSERT INTO duplicates VALUES (?, ?, ?)", rows)


def copy_from(
    conn: sqlite3.Connection,
    other: Path,
    image_ids: Iterable[int] | None = None,
    duplicate_ids: Iterable[int] | None = None,
) -> None:
    """Copy images (with their thumbnails, from the other version's thumbs.sqlite or, written
    before it, its images.thumbnail) and duplicates of another meta.sqlite; None copies all."""
    image_ids = None if image_ids is None else [int(i) for i in image_ids]  # read twice
    conn.execute("ATTACH DATABASE ? AS other", (str(other),))
    inline = has_column(conn, "images", "thumbnail", "other")
    if not inline:
        conn.execute("ATTACH DATABASE ? AS other_thumbs", (str(Path(other).parent / THUMBS_DB),))
    try:
        columns = ", ".join(COLUMNS)
        _copy_table(conn, "images", image_ids, columns)
        if inline:
            _copy_table(conn, "thumbs.thumbnails", image_ids, "id, thumbnail", "other.images")
        else:
            _copy_table(conn, "thumbs.thumbnails", image_ids, "id, jpeg", "other_thumbs.thumbnails")
        _copy_table(conn, "duplicates", duplicate_ids)
        if _has_table(conn, "other", SKIPPED_TABLE):  # written by remote sources (DICOMweb) only
            _create_skipped(conn)
            conn.execute(
                f"INSERT OR REPLACE INTO {SKIPPED_TABLE} SELECT * FROM other.{SKIPPED_TABLE}"
            )
        conn.commit()
    finally:
        conn.execute("DETACH DATABASE other")
        if not inline:
            conn.execute("DETACH DATABASE other_thumbs")


def _copy_table(
    conn: sqlite3.Connection,
    table: str,
    ids: Iterable[int] | None,
    columns: str = "*",
    source: str | None = None,
) -> None:
    """Copy `columns` of the rows of `source` (default: the same table in `other`) whose id is
    in `ids` (None: all) into `table`."""
    source = source or f"other.{table}"
    if ids is None:
        conn.execute(f"INSERT INTO {table} SELECT {columns} FROM {source}")
        return
    conn.execute("CREATE TEMP TABLE keep (id INTEGER PRIMARY KEY)")
    conn.executemany("INSERT OR IGNORE INTO temp.keep VALUES (?)", ((int(i),) for i in ids))
    conn.execute(f"INSERT INTO {table} SELECT {columns} FROM {source} WHERE id IN temp.keep")
    conn.execute("DROP TABLE temp.keep")


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
        "(SELECT path FROM images WHERE images.id = duplicates.id) "
        "WHERE id IN (SELECT id FROM images) OR duplicate_of = ''"
    )  # a segment's duplicate of an image an earlier segment holds keeps the path it was given
    conn.execute("DELETE FROM duplicates WHERE path = duplicate_of OR duplicate_of IS NULL")
    conn.execute(
        "DELETE FROM duplicates "
        "WHERE rowid NOT IN (SELECT min(rowid) FROM duplicates GROUP BY path)"
    )
    conn.commit()


def drop_duplicates_of(conn: sqlite3.Connection, ids: np.ndarray) -> None:
    """Forget the duplicate paths of images no longer served (ids)."""
    conn.execute("CREATE TEMP TABLE doomed (id INTEGER PRIMARY KEY)")
    conn.executemany("INSERT OR IGNORE INTO temp.doomed VALUES (?)", ((int(i),) for i in ids))
    conn.execute("DELETE FROM duplicates WHERE id IN temp.doomed")
    conn.execute("DROP TABLE temp.doomed")
    conn.commit()


def duplicate_entries(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every duplicate (settled first), by path: {path, id, duplicate_of}."""
    settle_duplicates(conn)
    rows = conn.execute("SELECT path, id, duplicate_of FROM duplicates ORDER BY path")
    return [{"path": p, "id": i, "duplicate_of": d} for p, i, d in rows]


# -- what a remote source skipped (DICOMweb: reports, instances without pixels) ---------------------
SKIPPED_TABLE = "not_indexed"  # its name on disk


def _has_table(conn: sqlite3.Connection, schema: str, table: str) -> bool:
    query = f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?"
    return conn.execute(query, (table,)).fetchone() is not None


def has_skipped_table(conn: sqlite3.Connection) -> bool:
    return _has_table(conn, "main", SKIPPED_TABLE)


def _create_skipped(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {SKIPPED_TABLE} (path TEXT PRIMARY KEY, reason TEXT NOT NULL)"
    )


def record_skipped(conn: sqlite3.Connection, rows: Iterable[tuple[str, str]]) -> None:
    """(path, reason) of things a source holds that are not images of the index, so that a later
    sync knows them without fetching them again."""
    _create_skipped(conn)
    conn.executemany(f"INSERT OR REPLACE INTO {SKIPPED_TABLE} VALUES (?, ?)", rows)


def forget_skipped(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    if _has_table(conn, "main", SKIPPED_TABLE):
        conn.executemany(f"DELETE FROM {SKIPPED_TABLE} WHERE path = ?", [(p,) for p in paths])


def _under(prefix: str) -> tuple[str, list[Any]]:
    """SQL (and its parameters) for "path starts with prefix" that reads the path index: a
    range from prefix to its successor (the last character one higher), then the exact test."""
    clause, params = "path >= ?", [prefix]
    last = ord(prefix[-1]) + 1 if prefix else None
    if last is not None and last <= 0x10FFFF and not 0xD800 <= last <= 0xDFFF:
        clause, params = clause + " AND path < ?", [*params, prefix[:-1] + chr(last)]
    return clause + " AND substr(path, 1, ?) = ?", [*params, len(prefix), prefix]


def paths_under(conn: sqlite3.Connection, prefix: str) -> tuple[dict[str, int], dict[str, str]]:
    """({path: id} of the images, {path: reason} of what was skipped) whose path starts with
    prefix (a remote source's URL)."""
    start, params = _under(prefix)
    images = {
        path: image_id
        for image_id, path in conn.execute(f"SELECT id, path FROM images WHERE {start}", params)
    }
    seen: dict[str, str] = {}
    if _has_table(conn, "main", SKIPPED_TABLE):
        query = f"SELECT path, reason FROM {SKIPPED_TABLE} WHERE {start}"
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


def lacks_report_under(conn: sqlite3.Connection, prefix: str) -> bool:
    """Whether an image whose path starts with prefix (a study's URL) has no report."""
    start, params = _under(prefix)
    query = f"SELECT 1 FROM images WHERE {start} AND report = '' LIMIT 1"
    return conn.execute(query, params).fetchone() is not None


def fill_reports_under(conn: sqlite3.Connection, prefix: str, report: str) -> int:
    """Give the images under prefix (a study's URL) that have no report this one; how many."""
    start, params = _under(prefix)
    done = conn.execute(
        f"UPDATE images SET report = ? WHERE {start} AND report = ''", [report, *params]
    )
    return done.rowcount


def rename_former_names(conn: sqlite3.Connection) -> int:
    """Give DICOM images' metadata the naming table's spellings (convirt.imagerecord), where a
    version built before it stored FORMER_NAMES (study_uid, modality, ...): the migration
    `convirt index reindex` makes. A DICOM image: a PACS instance or a file named .dcm/.dicom.
    How many rows changed."""
    from convirt.imageio import DICOM_SUFFIXES
    from convirt.imagerecord import FORMER_NAMES, renamed_former

    marks = ", ".join("?" * len(FORMER_NAMES))
    query = (
        "SELECT DISTINCT images.id, images.path, images.meta FROM images, json_each(images.meta) "
        f"WHERE json_each.key IN ({marks})"
    )
    changed = []
    for image_id, path, meta in conn.execute(query, list(FORMER_NAMES)).fetchall():
        if path.startswith("dicomweb://") or Path(path).suffix.lower() in DICOM_SUFFIXES:
            renamed = renamed_former(json.loads(meta))
            changed.append((json.dumps(renamed, sort_keys=True), image_id))
    conn.executemany("UPDATE images SET meta = ? WHERE id = ?", changed)
    conn.commit()
    return len(changed)


# -- normalised fields (index.fields), derived at every publish -----------------------------------
DERIVE_BATCH = 5000


def derive_fields(conn: sqlite3.Connection) -> int:
    """Give every row the normalised modality (its column) and body part, with the originals
    (index.fields.with_derived): run on the version being published by every write, so a
    version built before the vocabulary gets it from any later write (`convirt index
    reindex`). How many rows changed."""
    changed, last = 0, None
    while True:
        query = "SELECT id, source, modality, meta FROM images"
        page = conn.execute(
            f"{query} {'WHERE id > ? ' if last is not None else ''}ORDER BY id LIMIT ?",
            ([last] if last is not None else []) + [DERIVE_BATCH],
        ).fetchall()
        if not page:
            conn.commit()
            return changed
        updates = []
        for image_id, source, modality, meta in page:
            old = json.loads(meta)
            new_modality, new = with_derived(old, source)
            if new_modality != modality or new != old:
                updates.append((new_modality, json.dumps(new, sort_keys=True), image_id))
        conn.executemany("UPDATE images SET modality = ?, meta = ? WHERE id = ?", updates)
        changed += len(updates)
        last = page[-1][0]


# -- rows of newly embedded images --------------------------------------------------------------


def image_row(item: ManifestItem, record: ImageRecord, source: Source) -> tuple:
    """An image's row: its record (DICOM header fields under the naming table's names) and what
    its source says of it (a manifest's fields, a PACS's listing; non-empty ones win). Its
    modality is the source's text here; publishing normalises it (derive_fields)."""
    meta = {**record.header, **{k: v for k, v in item.meta.items() if v != ""}}
    return (
        content_id(record.sha256),
        source.name_of(item.path),
        item.relpath,
        str(source.location),
        record.sha256,
        record.size_bytes,
        record.width,
        record.height,
        meta.get("modality") or meta.get("Modality") or None,
        meta.get("view") or meta.get("ViewPosition") or None,
        item.text,
        json.dumps(meta, sort_keys=True),
        record.thumbnail,
    )


def insert_new(
    conn,
    kept: list[tuple[ManifestItem, str]],
    staging: Staging | None,
    source: Source,
    current: VersionFiles | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Insert the metadata rows of newly embedded images; their ids and vectors, in that order.
    Without a staging area (nothing was embedded) the dimensions are those of `current`."""
    if staging is not None:
        encoder_dim, joint_dim = staging.dims
    else:
        encoder_dim, joint_dim = current.info["dims"]["encoder"], current.info["dims"]["joint"]
    ids = np.zeros(len(kept), np.int64)
    vectors = {
        "encoder": np.zeros((len(kept), encoder_dim), np.float32),
        "joint": np.zeros((len(kept), joint_dim), np.float32),
    }
    rows = []
    for row, (item, sha) in enumerate(kept):
        record = staging.get(sha)
        ids[row] = content_id(sha)
        vectors["encoder"][row], vectors["joint"][row] = record.encoder, record.joint
        rows.append(image_row(item, record, source))
        if len(rows) >= 1000:
            insert_rows(conn, rows)
            rows = []
    insert_rows(conn, rows)
    return ids, vectors


def duplicate_rows(
    job: JobResult, source: Source, already: Sequence[str] = ()
) -> list[tuple[str, int, str]]:
    """Duplicates table rows: every other path of a kept content (repeated rows excluded)."""
    name = source.name_of
    rows = [
        (name(d.item.path), content_id(d.sha256), name(d.first))
        for d in job.duplicates
        if name(d.item.path) != name(d.first)
    ]
    rows += [
        (name(item.path), content_id(sha), "")
        for item, sha in job.known
        if name(item.path) not in already
    ]
    return rows
