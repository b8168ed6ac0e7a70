"""What a server checks before it switches to a version: every file it reads opens and they agree.
Cheaper than `convirt index verify` (index/write/checks.py), so it runs at every start and reload.

The metadata databases are checked by their headers, schema and counts, not page by page: a
`PRAGMA quick_check` reads every page (minutes at 10M images), so it runs where a version is
written (index/write/lookups.py `check`, before publish) and `convirt index verify` runs
`PRAGMA integrity_check`. What a start or reload still refuses: a file that is missing, not
SQLite, shorter than its header says (truncated), whose schema cannot be read, or whose image
count disagrees with FAISS, the vectors and version.json."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metadata
from ..errors import CorruptVersionError, IndexStoreError, reason
from ..version import SPACES, VersionFiles, load_array


@dataclass
class OpenedVersion:
    """A version's FAISS indexes, ids, vectors (memory-mapped) and metadata, checked to agree."""

    indexes: dict[str, Any]
    ids: np.ndarray
    vectors: dict[str, np.ndarray]
    db: sqlite3.Connection


def open_checked(files: VersionFiles) -> OpenedVersion:
    """Open what a server reads and check it; CorruptVersionError lists every problem found.

    Both FAISS files must load, ids.npy and the .npy vectors must load with the recorded
    dimensions, meta.sqlite (and thumbs.sqlite, where the version has one) must pass
    `header_problem` and read its schema, and FAISS, the vectors, SQLite and version.json must
    count the same images. Cheaper than `verify` (no per-vector comparison, no image files, no
    page-by-page check), so it runs at every start and reload.
    """
    problems: list[str] = []
    counts: dict[str, int] = {}
    dims = files.info.get("dims") or {}
    indexes: dict[str, Any] = {}
    for space in SPACES:
        path = files.directory / f"{space}.faiss"
        changed = path.is_file() and files.checksum_problem(path.name)
        if changed:
            problems.append(changed)
            continue
        try:
            index = files.faiss_index(space)
        except Exception as err:
            problems.append(f"{space}.faiss cannot be read: {reason(err)}")
            continue
        if index.d != dims.get(space):
            problems.append(f"{space}.faiss has dimension {index.d}, expected {dims.get(space)}")
        indexes[space], counts[f"{space}.faiss"] = index, int(index.ntotal)
    ids = load_array(files.ids, "ids.npy", problems)
    if ids is not None:
        counts["ids.npy"] = len(ids)
        changed = files.checksum_problem("ids.npy")
        if changed:
            problems.append(changed)
    vectors: dict[str, np.ndarray] = {}
    for space in SPACES:
        array = load_array(
            lambda space=space: files.vectors(space, mmap=True), f"{space}.npy", problems
        )
        if array is None:
            continue
        if array.ndim != 2 or array.shape[1] != dims.get(space):
            problems.append(f"{space}.npy has shape {array.shape}, expected N x {dims.get(space)}")
        else:
            counts[f"{space}.npy"] = array.shape[0]
        vectors[space] = array
    db = None
    try:
        db = metadata.open_readonly(files.meta_path)
        damaged = header_problem(files.meta_path)
        if damaged:
            problems.append(f"meta.sqlite is damaged: {damaged}")
        else:
            counts["meta.sqlite"] = db.execute("SELECT count(*) FROM images").fetchone()[0]
            if not metadata.has_column(db, "images", "thumbnail"):  # written since issue 25
                thumbs = files.directory / metadata.THUMBS_DB
                damaged = header_problem(thumbs)
                if damaged:
                    problems.append(f"{metadata.THUMBS_DB} is damaged: {damaged}")
                else:
                    metadata.attach_thumbnails(db, thumbs)
                    db.execute("SELECT 1 FROM thumbs.thumbnails LIMIT 1").fetchall()
    except (sqlite3.Error, IndexStoreError) as err:
        problems.append(f"meta.sqlite cannot be read: {err}")
    expected = files.info.get("count")
    if any(n != expected for n in counts.values()):
        listed = ", ".join(f"{name} {n}" for name, n in counts.items())
        problems.append(f"image counts disagree: version.json says {expected}, {listed}")
    if problems:
        if db is not None:
            db.close()
        raise CorruptVersionError(files.directory, problems)
    assert ids is not None and db is not None
    return OpenedVersion(indexes, ids, vectors, db)


SQLITE_MAGIC = b"SQLite format 3\x00"


def header_problem(path: Path) -> str | None:
    """What is wrong with an SQLite file judged by its 100-byte header, or None: missing, not
    SQLite, or shorter than the pages its header counts (a truncated copy). Reads one page's
    worth of bytes whatever the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError as err:
        return f"{path.name} cannot be read ({reason(err)})"
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return f"{path.name} is not an SQLite database (its header is wrong)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # the page count is valid where the "version-valid-for" number equals the change counter
    if header[92:96] == header[24:28] and pages and size < pages * page_size:
        return (
            f"{path.name} is truncated: {size} bytes where its header counts {pages} pages of "
            f"{page_size} bytes"
        )
    if size % page_size:
        return f"{path.name} is truncated: {size} bytes is not a whole number of pages"
    return None
