"""Segments: how add, sync, remove and compact write a format-2 version (the format:
index/version.py, read through its VersionFiles).

A write costs what it changes, not what exists: an add writes one new segment holding only the new
images (its own ids, vectors, FAISS structures, metadata rows and thumbnails) and a version that
lists the old segments plus the new one; a removal only adds ids to deleted.npy. Segments are
immutable, so a change to a row a segment already holds (a duplicate path or a remembered skip to
forget, a report joined to indexed images, an id removed earlier and now added again) rewrites
that segment's live rows into the new segment, which replaces it in the list ("touched").

Per segment meta.sqlite: `images` holds its own rows; `duplicates` holds duplicate paths found by
the write that made it (their id may be held by an earlier segment: readers take the union of the
segments' duplicates for an id); `not_indexed` (a PACS's skips) is the union, later segments
winning for one path.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import layout, metadata
from ..errors import IndexStoreError
from ..fields import FIELDS_VERSION
from ..version import (
    DELETED_NAME,
    INFO_NAME,
    OUTCOME_NAME,
    SEGMENTED_FORMAT,
    SPACES,
    VersionFiles,
    checksums,
    read_version,
)
from . import rows
from .template import Write, now_iso


@dataclass
class Listing:
    """The segments a version serves (paths relative to ROOT, in order) and the ids it does not."""

    root: Path
    paths: list[str]
    files: list[VersionFiles]
    deleted: np.ndarray

    @classmethod
    def of(cls, current: VersionFiles) -> Listing:
        root = current.directory.parent.parent
        files = current.segments()
        paths = [relative(root, f.directory) for f in files]
        return cls(root, paths, files, np.asarray(current.deleted(), dtype=np.int64))

    def ids(self, position: int) -> np.ndarray:
        return self.files[position].ids()

    def live(self, position: int) -> np.ndarray:
        """A mask over segment `position`'s rows: those this version serves."""
        return ~np.isin(self.ids(position), self.deleted)

    def live_ids(self) -> np.ndarray:
        parts = [self.ids(i)[self.live(i)] for i in range(len(self.files))]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def sizes(self) -> list[tuple[int, int]]:
        """(live rows, all rows) of each segment."""
        return [(int(self.live(i).sum()), len(self.ids(i))) for i in range(len(self.files))]

    def holding(self, ids: Iterable[int]) -> set[int]:
        """Positions of the segments that hold any of `ids` (live or deleted)."""
        wanted = np.asarray(sorted({int(i) for i in ids}), dtype=np.int64)
        if not len(wanted):
            return set()
        return {i for i in range(len(self.files)) if np.isin(wanted, self.ids(i)).any()}

    def with_paths(self, table: str, paths: Iterable[str]) -> set[int]:
        """Positions of the segments whose `table` (duplicates, not_indexed) lists any of paths."""
        wanted = [(p,) for p in sorted(set(paths))]
        found = set()
        if not wanted:
            return found
        for position, files in enumerate(self.files):
            with closing(metadata.open_readonly(files.meta_path)) as conn:
                if table == rows.SKIPPED_TABLE and not rows.has_skipped_table(conn):
                    continue
                conn.execute("CREATE TEMP TABLE wanted (path TEXT PRIMARY KEY)")
                conn.executemany("INSERT OR IGNORE INTO temp.wanted VALUES (?)", wanted)
                query = f"SELECT 1 FROM {table} WHERE path IN temp.wanted LIMIT 1"
                if conn.execute(query).fetchone():
                    found.add(position)
        return found

    def rows_query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of `sql` (selecting id first) over every segment's live images."""
        found = []
        for position, files in enumerate(self.files):
            dead = set(self.deleted[np.isin(self.deleted, self.ids(position))].tolist())
            with closing(metadata.open_readonly(files.meta_path)) as conn:
                found += [row for row in conn.execute(sql, params) if row[0] not in dead]
        return found

    def live_content(self) -> LiveContent:
        """Which contents (sha256) this version serves, looked up among its live ids."""
        return LiveContent(self.live_ids())

    def ids_of_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """path -> id of the live images stored under these paths (one indexed lookup per
        segment, never a read of every row: an add to a 10M-image version names few paths)."""
        return {path: i for i, path in self._live_where("path", sorted(set(paths)))}

    def paths_of_ids(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> path of these live images."""
        return dict(self._live_where("id", sorted({int(i) for i in ids})))

    def _live_where(self, column: str, values: list) -> list[tuple[int, str]]:
        """(id, path) of the live images whose `column` (id or path) is one of `values`."""
        if not values:
            return []
        sql = f"SELECT id, path FROM images WHERE {column} IN temp.wanted"
        found = []
        for position, files in enumerate(self.files):
            dead = set(self.deleted[np.isin(self.deleted, self.ids(position))].tolist())
            with closing(metadata.open_readonly(files.meta_path)) as conn:
                conn.execute("CREATE TEMP TABLE wanted (value PRIMARY KEY)")
                conn.executemany(
                    "INSERT OR IGNORE INTO temp.wanted VALUES (?)", [(v,) for v in values]
                )
                found += [row for row in conn.execute(sql) if row[0] not in dead]
        return found

    def paths_under(self, prefix: str) -> tuple[dict[str, int], dict[str, str]]:
        """rows.paths_under over the version: live images, and skips (later segments win)."""
        images: dict[str, int] = {}
        seen: dict[str, str] = {}
        for position, files in enumerate(self.files):
            dead = set(self.deleted[np.isin(self.deleted, self.ids(position))].tolist())
            with closing(metadata.open_readonly(files.meta_path)) as conn:
                mine, skipped = rows.paths_under(conn, prefix)
            images.update({p: i for p, i in mine.items() if i not in dead})
            seen.update(skipped)
        return images, seen

    def ids_for_path(self, path: str) -> list[int]:
        """Live ids of images stored under `path` (absolute or relative to its source)."""
        query = "SELECT id FROM images WHERE path = ? OR relpath = ?"
        return sorted({row[0] for row in self.rows_query(query, (path, path))})

    def is_duplicate_path(self, path: str, live: set[int]) -> bool:
        """Whether `path` is a duplicate path of a live image."""
        for files in self.files:
            with closing(metadata.open_readonly(files.meta_path)) as conn:
                found = conn.execute("SELECT id FROM duplicates WHERE path = ?", (path,))
                if any(row[0] in live for row in found):
                    return True
        return False

    def duplicate_count(self) -> int:
        """Duplicate paths of live images, over every segment."""
        live = self.live_ids()
        found = 0
        for files in self.files:
            with closing(metadata.open_readonly(files.meta_path)) as conn:
                ids = [row[0] for row in conn.execute("SELECT id FROM duplicates")]
            found += int(np.isin(np.asarray(ids, dtype=np.int64), live).sum())
        return found


class LiveContent:
    """`sha256 in LiveContent(ids)`: whether a version serves that content, found by its content
    id (rows.content_id) in the sorted live ids (8 bytes an image, a binary search per lookup)."""

    def __init__(self, live_ids: np.ndarray):
        self.ids = np.asarray(live_ids, dtype=np.int64)

    def __contains__(self, sha256: object) -> bool:
        if not isinstance(sha256, str):
            return False
        image_id = metadata.content_id(sha256)
        at = int(np.searchsorted(self.ids, image_id))
        return at < len(self.ids) and int(self.ids[at]) == image_id


def relative(root: Path, directory: Path) -> str:
    return Path(directory).absolute().relative_to(Path(root).absolute()).as_posix()


def gather(
    w: Write, listing: Listing, positions: Iterable[int], gone: Iterable[int] = ()
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Copy the live rows (metadata, thumbnails, duplicates, skips) of the segments at
    `positions`, less the ids `gone`, into w.meta; their ids and vectors."""
    gone = np.union1d(listing.deleted, np.asarray(sorted(set(gone)), dtype=np.int64))
    positions = sorted(positions)
    ids_parts, vector_parts = [], {space: [] for space in SPACES}
    for position in positions:
        files = listing.files[position]
        ids = files.ids()
        keep = ~np.isin(ids, gone)
        rows.copy_from(w.meta, files.meta_path, ids[keep], None)
        ids_parts.append(ids[keep])
        for space in SPACES:
            vector_parts[space].append(np.asarray(files.vectors(space)[keep], dtype=np.float32))
    if not positions:
        dims = listing.files[0].info["dims"]
        return np.zeros(0, np.int64), {s: np.zeros((0, dims[s]), np.float32) for s in SPACES}
    rows.drop_duplicates_of(w.meta, gone)
    return np.concatenate(ids_parts), {s: np.concatenate(p) for s, p in vector_parts.items()}


def segment_index_type(requested: str | None, count: int) -> str:
    """A segment's --index-type: a small one is searched exactly whatever the version asked
    (too few vectors to train codes or to be worth a graph); `auto` chooses from its own count."""
    from ..faiss_index import AUTO_EXACT_MAX

    requested = requested or "auto"
    return "auto" if count < AUTO_EXACT_MAX else requested


def publish_listing(
    w: Write,
    listing: Listing,
    replaced: Sequence[int],
    new_segment: Path | None,
    gone: Iterable[int],
    info: dict[str, Any],
    outcome: dict[str, Any],
    changes: dict[str, int] | None = None,
) -> Path:
    """Publish a format-2 version: the segments of `listing` less those at `replaced` (their live
    rows were rewritten into `new_segment`), with `new_segment` where the first replaced one was
    (else last); deleted = old deleted + `gone`, less ids no listed segment holds any more."""
    replaced = sorted(replaced)
    kept = [i for i in range(len(listing.files)) if i not in replaced]
    paths = [listing.paths[i] for i in kept]
    files = [listing.files[i] for i in kept]
    if new_segment is not None:
        at = sum(1 for i in kept if replaced and i < replaced[0]) if replaced else len(paths)
        paths.insert(at, relative(listing.root, new_segment))
        files.insert(at, read_segment(new_segment))
    held = [f.ids() for f in files]
    earlier = listing.deleted
    if new_segment is not None:  # an id removed earlier and added again is live in it
        earlier = earlier[~np.isin(earlier, files[at].ids())]
    doomed = np.union1d(earlier, np.asarray(sorted(set(gone)), dtype=np.int64))
    deleted = doomed[np.isin(doomed, np.concatenate(held))] if held else doomed[:0]
    count = sum(len(ids) for ids in held) - len(deleted)
    final = Listing(listing.root, paths, files, deleted)
    name = layout.next_version_name(w.root) if new_segment is None else new_segment.name
    directory = layout.new_tmp_dir(w.root, f"{name}-list")
    try:
        np.save(directory / DELETED_NAME, np.ascontiguousarray(deleted, dtype=np.int64))
        largest = max(files, key=lambda f: f.info["count"]) if files else None
        info = {
            **info,
            "operation": w.operation,
            "parent": w.parent,
            "format": SEGMENTED_FORMAT,
            "version": name,
            "segments": paths,
            "deleted": len(deleted),
            "count": int(count),
            "duplicates": final.duplicate_count(),
            "fingerprint": files[0].fingerprint if files else info.get("fingerprint"),
            "dims": files[0].info["dims"] if files else info.get("dims"),
            "factory": largest.info.get("factory") if largest else None,
            "recall_at_10": largest.info.get("recall_at_10") if largest else None,
            "created_at": now_iso(),
            "seconds": round(time.perf_counter() - w.started, 3),
            "sentences": sentences_info(files, files[at] if new_segment is not None else None),
            "fields": FIELDS_VERSION,
            "checksums": checksums(directory),
        }
        (directory / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        outcome = {"version": name, "operation": w.operation, **outcome}
        (directory / OUTCOME_NAME).write_text(json.dumps(outcome, indent=2) + "\n")
        published = layout.publish_version(w.root, directory, name)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    w.published_as(published, outcome.get("counts", {}) if changes is None else changes)
    return published


def read_segment(directory: Path) -> VersionFiles:
    return read_version(directory)


def sentences_info(files: Sequence[VersionFiles], new: VersionFiles | None) -> dict | None:
    """The version's sentence space, when every segment has one: `count` summed over the
    segments (a sentence two segments hold counts twice), `embedded` and `reused` what this
    write's new segment did (nothing, for a removal: every vector stays where it was)."""
    parts = [f.info.get("sentences") for f in files]
    if not parts or any(not isinstance(p, dict) for p in parts):
        return None
    own = (new.info.get("sentences") or {}) if new is not None else {}
    return {
        "count": sum(int(p.get("count") or 0) for p in parts),
        "embedded": int(own.get("embedded") or 0),
        "reused": int(own.get("reused") or 0),
    }


def segment_info(current: VersionFiles) -> dict[str, Any]:
    """What a new segment (or a format-2 version) inherits from the version it follows: the
    model, the source, a PACS's position and the requested index type, not its own counts."""
    own = {
        "format", "version", "segments", "deleted", "count", "factory", "recall_at_10",
        "created_at", "seconds", "sentences", "checksums", "operation", "parent", "dims",
    }  # fmt: skip
    return {k: v for k, v in current.info.items() if k not in own}


def refuse_damaged(listing: Listing) -> None:
    """Every segment of one version must share the version's model."""
    prints = {f.fingerprint for f in listing.files}
    if len(prints) > 1:
        raise IndexStoreError(
            f"the segments of {listing.root} were embedded by different models "
            f"({', '.join(sorted(prints))}): the version is damaged; rebuild it"
        )
