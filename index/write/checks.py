"""`convirt index info` (what a root holds) and `convirt index verify` (index, metadata and image
files agree). What a server checks before it opens a version is index/read/opening.py."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convirt.hashing import sha256_file

from .. import faiss_index, layout, metadata
from ..errors import IndexStoreError, reason
from ..layout import human
from ..sources.remote import is_remote
from ..version import (
    DELETED_NAME,
    SENTENCE_VECTORS,
    SPACES,
    VersionFiles,
    load_array,
    read_version,
)

NORM_TOLERANCE = 1e-3


def info(root: str | Path) -> dict[str, Any]:
    """The current version's fingerprint, counts, index type, sizes and build time."""
    root = Path(root)
    files = read_version(layout.current_version_dir(root))
    data = files.info
    sizes: dict[str, int] = {}
    for directory in [files.directory, *(files.segment_dirs if files.is_segmented else [])]:
        for p in sorted(directory.iterdir()):
            if p.is_file():
                sizes[p.name] = sizes.get(p.name, 0) + p.stat().st_size
    staging = root / layout.STAGING_DIR
    return {
        "root": str(root.absolute()),
        "version": files.name,
        "versions": layout.list_versions(root),
        "fingerprint": data["fingerprint"],
        "model": data.get("model"),
        "operation": data.get("operation"),
        "parent": data.get("parent"),
        "shard": data.get("shard"),
        "source": data.get("source"),
        "images": data["count"],
        "segments": data.get("segments") or [files.directory.relative_to(root).as_posix()],
        "deleted": data.get("deleted", 0),
        "duplicates": data.get("duplicates", 0),
        "skipped": data.get("skipped", 0),
        "index_type": data.get("index_type"),
        "factory": data.get("factory"),
        "recall_at_10": data.get("recall_at_10"),
        "ram_bytes_per_image": ram_per_image(sizes, data["count"]),
        "disk_bytes_per_image": round(sum(sizes.values()) / max(data["count"], 1)),
        "dims": data["dims"],
        "created_at": data.get("created_at"),
        "seconds": data.get("seconds"),
        "embed_seconds": data.get("embed_seconds"),
        "sizes_bytes": sizes,
        "total_bytes": sum(sizes.values()),
        "unfinished_jobs": sorted(p.name for p in staging.iterdir()) if staging.is_dir() else [],
    }


def ram_per_image(sizes: dict[str, int], count: int) -> dict[str, int]:
    """What a server holds in RAM per image, by space: the {space}.faiss file as loaded (a
    compressed index's float16 vectors stay on disk, memory-mapped), plus the report sentences'
    vectors, held once, in their exact FAISS index (index/read/sentences.py)."""
    held = {space: sizes.get(f"{space}.faiss", 0) for space in SPACES}
    held["sentences"] = sizes.get(SENTENCE_VECTORS, 0)
    return {space: round(size / max(count, 1)) for space, size in held.items()}


def format_info(data: dict[str, Any]) -> str:
    lines = []
    for key, value in data.items():
        if key == "sizes_bytes":
            value = ", ".join(f"{name} {human(size)}" for name, size in value.items())
        elif key == "total_bytes":
            value = human(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        lines.append(f"{key + ':':<16}{value}")
    return "\n".join(lines)


@dataclass
class Verification:
    version: str
    checked: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ok": self.ok,
            "checked": self.checked,
            "problems": self.problems,
        }


def verify(root: str | Path, fingerprint: str | None = None, hashes: bool = False) -> Verification:
    """Check the current version: ids, vectors, FAISS, SQLite and (re-hashed) image files agree.

    Damaged files (truncated, garbled, unreadable) are findings like any other disagreement."""
    root = Path(root)
    directory = layout.current_version_dir(root)
    try:
        files = read_version(directory)
    except IndexStoreError as err:
        return Verification(directory.name, problems=[str(err)])
    result = Verification(files.name)
    if fingerprint is not None and fingerprint != files.fingerprint:
        result.problems.append(
            f"built with model {files.fingerprint}, the given bundle is {fingerprint}"
        )
    if files.is_segmented:
        return verify_segments(files, result, hashes)
    verify_segment(files, result, hashes)
    return result


def verify_segment(
    files: VersionFiles,
    result: Verification,
    hashes: bool,
    known: np.ndarray | None = None,
    deleted: np.ndarray | None = None,
) -> None:
    """One format-1 directory (a version, or a segment of one: its duplicates may name ids
    `known` to other segments, its rows `deleted` are not checked against the image files)."""
    ids = check_vectors(files, result)
    if not files.info.get("shard"):
        check_faiss(files, ids, result)
    try:
        with closing(metadata.open_readonly(files.meta_path)) as conn:
            check_metadata(conn, files, ids, result, known)
            check_files(conn, result, hashes, deleted)
    except sqlite3.Error as err:
        result.problems.append(f"meta.sqlite cannot be read: {err}")
    check_checksums(files, result)


def verify_segments(files: VersionFiles, result: Verification, hashes: bool) -> Verification:
    """A format-2 version: each segment checked as a version, then deleted.npy and the count."""
    check_checksums(files, result)
    deleted = load_array(files.deleted, DELETED_NAME, result.problems)
    try:
        parts = files.segments()
    except IndexStoreError as err:
        result.problems.append(str(err))
        return result
    everything = np.concatenate([p.ids() for p in parts]) if parts else np.zeros(0, np.int64)
    totals: dict[str, int] = {}
    for part in parts:
        found = Verification(part.name)
        verify_segment(part, found, hashes, everything, deleted)
        where = part.directory.relative_to(files.root).as_posix()
        result.problems += [f"{where}: {problem}" for problem in found.problems]
        for key, n in found.checked.items():
            totals[key] = totals.get(key, 0) + n
        if part.fingerprint != files.fingerprint:
            result.problems.append(f"{where} was embedded by another model ({part.fingerprint})")
    result.checked.update(totals, segments=len(parts))
    if deleted is not None:
        live = len(np.unique(everything)) - int(np.isin(deleted, everything).sum())
        if len(np.unique(everything)) != len(everything):
            result.problems.append("an id is held by two segments")
        if live != files.info["count"]:
            result.problems.append(
                f"the segments serve {live} images, version.json says {files.info['count']}"
            )
    return result


def check_checksums(files: VersionFiles, result: Verification) -> None:
    """Files whose bytes changed since publish, but for those already found damaged."""
    recorded = sorted(files.info.get("checksums") or {})
    for name in recorded:
        if any(problem.startswith(name) for problem in result.problems):
            continue
        changed = (files.directory / name).is_file() and files.checksum_problem(name)
        if changed:
            result.problems.append(changed)
    result.checked["checksums"] = len(recorded)


def check_vectors(files: VersionFiles, result: Verification) -> np.ndarray | None:
    ids = load_array(files.ids, "ids.npy", result.problems)
    if ids is None:
        return None
    if len(ids) != files.info["count"]:
        result.problems.append(
            f"ids.npy has {len(ids)} ids, version.json says {files.info['count']}"
        )
    if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
        result.problems.append("ids.npy is not sorted and unique")
    for space in SPACES:
        vectors = load_array(
            lambda space=space: files.vectors(space, mmap=True), f"{space}.npy", result.problems
        )
        if vectors is None:
            continue
        expected = (len(ids), files.info["dims"][space])
        if vectors.shape != expected:
            result.problems.append(f"{space}.npy has shape {vectors.shape}, expected {expected}")
            continue
        norms = np.linalg.norm(np.asarray(vectors), axis=1)
        bad = int(np.sum(np.abs(norms - 1) > NORM_TOLERANCE))
        if bad:
            result.problems.append(f"{space}.npy: {bad} vectors are not L2-normalised")
    result.checked["vectors"] = len(ids)
    return ids


def check_faiss(files: VersionFiles, ids: np.ndarray | None, result: Verification) -> None:
    for space in SPACES:
        try:
            index = files.faiss_index(space)
        except Exception as err:
            result.problems.append(f"{space}.faiss cannot be read: {reason(err)}")
            continue
        if ids is None:
            if index.ntotal != files.info["count"]:
                result.problems.append(
                    f"{space}.faiss holds {index.ntotal} vectors, "
                    f"version.json says {files.info['count']}"
                )
        elif index.ntotal != len(ids):
            result.problems.append(
                f"{space}.faiss holds {index.ntotal} vectors, ids.npy {len(ids)}"
            )
        elif not np.array_equal(np.sort(faiss_index.ids_of(index)), ids):
            result.problems.append(f"{space}.faiss ids differ from ids.npy")
    result.checked["faiss_indexes"] = len(SPACES)


def check_metadata(
    conn,
    files: VersionFiles,
    ids: np.ndarray | None,
    result: Verification,
    known: np.ndarray | None = None,
) -> None:
    """Every page of meta.sqlite (and thumbs.sqlite) checked: the one full integrity check of a
    published version (a server checks headers and counts only, index/read/opening.py)."""
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    if integrity != "ok":
        result.problems.append(f"meta.sqlite is damaged: {integrity}")
    if not metadata.has_column(conn, "images", "thumbnail"):
        check_thumbnails(conn, files, result)
    stored = np.array([r[0] for r in conn.execute("SELECT id FROM images ORDER BY id")], np.int64)
    if ids is None:
        if len(stored) != files.info["count"]:
            result.problems.append(
                f"meta.sqlite has {len(stored)} images, version.json says {files.info['count']}"
            )
    elif not np.array_equal(stored, ids):
        extra, missing = np.setdiff1d(stored, ids), np.setdiff1d(ids, stored)
        result.problems.append(
            f"metadata and vectors disagree: {len(extra)} ids only in meta.sqlite, "
            f"{len(missing)} only in the vectors"
        )
    pointed = np.array([r[0] for r in conn.execute("SELECT id FROM duplicates")], np.int64)
    orphans = int((~np.isin(pointed, stored if known is None else known)).sum())
    if orphans:
        result.problems.append(f"{orphans} duplicate entries point at ids not in the index")
    result.checked["metadata_rows"] = len(stored)


def check_thumbnails(conn, files: VersionFiles, result: Verification) -> None:
    """thumbs.sqlite (versions written since issue 25): intact, one thumbnail per image."""
    try:
        metadata.attach_thumbnails(conn, files.directory / metadata.THUMBS_DB)
        integrity = conn.execute("PRAGMA thumbs.integrity_check").fetchone()[0]
        if integrity != "ok":
            result.problems.append(f"{metadata.THUMBS_DB} is damaged: {integrity}")
            return
        missing = conn.execute(
            "SELECT count(*) FROM images WHERE id NOT IN (SELECT id FROM thumbs.thumbnails)"
        ).fetchone()[0]
        extra = conn.execute(
            "SELECT count(*) FROM thumbs.thumbnails WHERE id NOT IN (SELECT id FROM images)"
        ).fetchone()[0]
    except (sqlite3.Error, IndexStoreError) as err:
        result.problems.append(f"{metadata.THUMBS_DB} cannot be read: {err}")
        return
    if missing or extra:
        result.problems.append(
            f"{metadata.THUMBS_DB} and meta.sqlite disagree: {missing} images without a "
            f"thumbnail, {extra} thumbnails of no image"
        )
    result.checked["thumbnails"] = conn.execute(
        "SELECT count(*) FROM thumbs.thumbnails"
    ).fetchone()[0]


def check_files(
    conn, result: Verification, hashes: bool, deleted: np.ndarray | None = None
) -> None:
    """Every indexed file is still there, at its size (and hash); rows `deleted` (removed from
    a format-2 version, still in its segment) aside. Images a PACS holds (dicomweb:// paths)
    are counted apart: `convirt index sync` is what reconciles those."""
    checked = remote = 0
    gone = set() if deleted is None else set(deleted.tolist())
    for image_id, path, sha, size in conn.execute(
        "SELECT id, path, sha256, size_bytes FROM images ORDER BY path"
    ):
        if image_id in gone:
            continue
        if is_remote(path):
            remote += 1
            continue
        checked += 1
        problem = file_problem(Path(path), sha, size, hashes)
        if problem:
            result.problems.append(
                f"{path} (id {image_id}): {problem}; restore the file or "
                f"`convirt index remove --root ROOT --id {image_id}`"
            )
    result.checked["image_files"] = checked
    if remote:
        result.checked["pacs_images_not_checked"] = remote


def file_problem(path: Path, sha: str, size: int, rehash: bool) -> str | None:
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        return "image file missing"
    except OSError as err:
        return f"image file unreadable ({err.strerror or err})"
    if actual_size != size:
        return f"image file changed (size {actual_size}, indexed {size})"
    if rehash and sha256_file(path) != sha:
        return "image file changed (content hash differs)"
    return None
