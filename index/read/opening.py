"""What a server checks before it switches to a version: every file it reads opens and they agree.
Cheaper than `convirt index verify` (index/write/checks.py), so it runs at every start and reload."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import metadata
from ..errors import CorruptVersionError, reason
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
    dimensions, meta.sqlite must pass `PRAGMA quick_check`, and FAISS, the vectors, SQLite and
    version.json must count the same images. Cheaper than `verify` (no per-vector comparison, no
    image files), so it runs at every start and reload.
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
        quick = [row[0] for row in db.execute("PRAGMA quick_check")]
        if quick != ["ok"]:
            problems.append(f"meta.sqlite is damaged: {'; '.join(quick[:3])}")
        else:
            counts["meta.sqlite"] = db.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error as err:
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
