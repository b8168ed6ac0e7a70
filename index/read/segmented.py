"""A format-2 version (a list of segments and the ids it no longer serves) served as one version.

add/sync/remove write a new segment or a deletion list instead of copying every vector (issue
25, the format: index/version.py). A server answers every query on such a version exactly as on a
format-1 version holding the same live images:

    ids, vectors   the live ids of every segment merged in order, with each one's segment and row;
                   the vectors stay in their segments (memory-mapped), read row by row (RowView)
    search         each segment's own FAISS structure (flat, HNSW or compressed, chosen by its own
                   size), its deleted ids left out as an exclusion is, the hits merged best first,
                   ties by id
    metadata       one SQLite connection with every segment's meta.sqlite attached and TEMP VIEWs
                   (`images`, `duplicates`, one per stored field table) that union them without the
                   deleted rows: rows, duplicates, groups read them; filters run on each segment's
                   own tables; the report_terms FTS5 tables (no view can hold one) are queried one
                   by one (index.read.keywords.ReportTerms), so the lexical IDF and RRF's ranks are
                   the whole version's
    sentences      one space, each text once, ordered as one build orders them (index.read.merging)
    facets         the segments' stored facets summed, the deleted rows' values taken off

Opening reads each segment's headers and counts (index.read.opening, per segment) and the ids,
never every row. SQLite attaches at most MAX_SEGMENTS databases to one connection: a version
listing more is refused with a message to compact (the writer compacts well before).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metadata
from ..errors import CorruptVersionError, IndexStoreError
from ..metadata import COLUMNS, FIELD_TABLES
from ..version import DELETED_NAME, VersionFiles, load_array
from . import lookup, sentences
from .facets import Facet
from .filters import FILTER_COLUMNS, FieldTables, filter_sql, filtered_ids
from .keywords import ReportTerms
from .merging import DELETED_TABLE, merged_facets, merged_sentences
from .opening import OpenedVersion, open_checked
from .search import Hit, among, search_within
from .store import IndexStore

MAX_SEGMENTS = 10  # SQLite's limit of databases attached to one connection (SQLITE_MAX_ATTACHED)


@dataclass
class Segment:
    """One segment of the version: its files, opened and checked, and what this version drops."""

    files: VersionFiles
    opened: OpenedVersion
    schema: str  # its meta.sqlite attached to the version's connection as this
    deleted: np.ndarray  # its ids this version does not serve (sorted)
    fields: frozenset[str] | None  # its manifest fields (None: written before field tables)
    tables: FieldTables  # its per-field tables, for filters

    @property
    def live(self) -> int:
        return len(self.opened.ids) - len(self.deleted)


class RowView:
    """The vectors of one space, row r belonging to the version's ids[r], read from the segment
    holding it: `view[row]` and `view[rows]` as on a numpy array, nothing concatenated."""

    def __init__(self, parts: list[np.ndarray], segment_of: np.ndarray, rows: np.ndarray):
        self.parts, self.segment_of, self.rows = parts, segment_of, rows
        self.dtype = parts[0].dtype if parts else np.dtype(np.float32)
        self.shape = (len(rows), parts[0].shape[1] if parts else 0)
        self.ndim = 2

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self.parts[self.segment_of[index]][self.rows[index]]
        wanted = np.asarray(index, dtype=np.int64)
        found = np.empty((len(wanted), self.shape[1]), self.dtype)
        owners = self.segment_of[wanted]
        for n in np.unique(owners).tolist():
            mask = owners == n
            found[mask] = self.parts[n][self.rows[wanted[mask]]]
        return found


class SegmentedStore(IndexStore):
    """An IndexStore over a format-2 version: the same answers as one over a format-1 version
    holding the same live images (facets: see `facets`)."""

    def _open(self, files: VersionFiles) -> None:
        self.parts = open_segments(files)
        try:
            self._assemble(files)
        except BaseException:
            self.close()
            raise

    def _assemble(self, files: VersionFiles) -> None:
        parts = self.parts
        held = [part.opened.ids[~np.isin(part.opened.ids, part.deleted)] for part in parts]
        every = np.concatenate(held)
        segment_of = np.concatenate([np.full(len(ids), n, np.int16) for n, ids in enumerate(held)])
        rows = np.concatenate([np.flatnonzero(~np.isin(p.opened.ids, p.deleted)) for p in parts])
        order = np.argsort(every, kind="stable")
        self.ids = every[order]
        self.segment_of, self.rows = segment_of[order], rows[order]
        twice = self.ids[1:][self.ids[1:] == self.ids[:-1]]
        problems = [f"image id {int(twice[0])} is live in two segments"] if len(twice) else []
        if files.info.get("count") != len(self.ids):
            problems.append(
                f"version.json counts {files.info.get('count')} images, its segments hold "
                f"{len(self.ids)} live ones"
            )
        if problems:
            raise CorruptVersionError(files.directory, problems)
        self.indexes = {
            space: [p.opened.indexes[space] for p in parts] for space in ("joint", "encoder")
        }
        self.vectors = {
            space: RowView([p.opened.vectors[space] for p in parts], self.segment_of, self.rows)
            for space in ("joint", "encoder")
            if all(space in p.opened.vectors for p in parts)
        }
        self.db = union_connection(parts)
        schemas = tuple(part.schema for part in parts)
        deleted = {part.schema: part.deleted for part in parts}
        self.report_terms = ReportTerms(self.db, schemas, deleted)
        self.meta_fields = frozenset().union(*(p.fields or frozenset() for p in parts))
        if any(part.fields is None for part in parts):
            self.meta_fields = lookup.meta_fields(self.db)  # every row's JSON, as before
            self._stored_tables = None
        else:
            self._stored_tables = field_views(self.db, parts)
        self._thumbs_apart = True  # per segment: _segment's
        self._field_tables = FieldTables(self.db, self._stored_tables, schema="temp")
        if files.info.get("sentences") and all(sentences.has_space(p.opened.db) for p in parts):
            try:
                self.sentences = merged_sentences(
                    self.db,
                    schemas,
                    [np.load(p.files.directory / sentences.SENTENCE_VECTORS) for p in parts],
                    [part.deleted for part in parts],
                )
            except (OSError, ValueError, sqlite3.Error) as err:
                raise CorruptVersionError(
                    files.directory, [f"the report sentences cannot be read: {err}"]
                ) from err

    def facets(self, max_values: int = 50) -> list[Facet]:
        """As IndexStore.facets, the segments' stored facets summed (no row read but the deleted
        ones'). Where a segment's stored values were cut (more than STORED_VALUES distinct), the
        sum holds the values each segment kept; a range's `distinct` counts a value held by two
        segments twice."""
        return super().facets(max_values)

    def thumbnail(self, image_id: int) -> bytes | None:
        part = self._segment(image_id)
        if part is None:
            return None
        apart = not metadata.has_column(part.opened.db, "images", "thumbnail")
        with self.lock:
            return lookup.thumbnail(part.opened.db, int(image_id), apart)

    def close(self) -> None:
        if hasattr(self, "db"):
            super().close()
        for part in self.parts:
            part.opened.db.close()

    # -- the hooks of IndexStore ------------------------------------------------------------------

    def _nearest(
        self,
        space: str,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        excluded: np.ndarray,
    ) -> list[list[Hit]]:
        merged: list[list[Hit]] = [[] for _ in queries]
        for part, index in zip(self.parts, self.indexes[space], strict=True):
            if part.live == 0:
                continue
            drop = np.union1d(part.deleted, np.intersect1d(part.opened.ids, excluded))
            # each segment is asked only for its own allowed ids
            own = None if allowed is None else np.asarray(among(allowed, part.opened.ids), np.int64)
            found = search_within(index, queries, k, own, drop)
            for hits, more in zip(merged, found, strict=True):
                hits += more
        return [sorted(hits, key=lambda hit: (-hit.score, hit.id))[:k] for hits in merged]

    def _stored_facets(self) -> list[Facet] | None:
        deleting = [part.schema for part in self.parts if len(part.deleted)]
        return merged_facets(self.db, [part.schema for part in self.parts], deleting)

    def _filtered(self, filters: Mapping[str, Any]) -> list[int]:
        filter_sql(filters, self.meta_fields)  # a client's mistake, whichever segment holds what
        found = []
        for part in self.parts:
            named = [key for key in filters if key not in FILTER_COLUMNS]
            if part.fields is not None and any(key not in part.fields for key in named):
                continue  # a field the segment has no value of: none of its rows passes
            ids = np.asarray(
                filtered_ids(self.db, filters, self.meta_fields, part.tables, part.schema),
                np.int64,
            )
            found.append(ids[~np.isin(ids, part.deleted)] if len(part.deleted) else ids)
        return np.concatenate(found).tolist() if found else []

    def _segment(self, image_id: int) -> Segment | None:
        try:
            row = self._row(int(image_id))
        except (KeyError, OverflowError, TypeError, ValueError):
            return None
        return self.parts[int(self.segment_of[row])]


def open_version(root: Path, files: VersionFiles) -> IndexStore:
    """One published version opened for reading (index.read.store.open_current): its segments
    served as one where it has several."""
    store = SegmentedStore if files.is_segmented else IndexStore
    return store(Path(root), files)


def open_segments(files: VersionFiles) -> list[Segment]:
    """Each segment of a format-2 version opened and checked (CorruptVersionError naming the
    version or the segment at fault), with the ids it drops."""
    try:
        listed = files.segments()
    except IndexStoreError as err:
        raise CorruptVersionError(files.directory, [f"a segment cannot be read: {err}"]) from None
    if len(listed) > MAX_SEGMENTS:
        raise IndexStoreError(
            f"index version {files.name} ({files.directory}) lists {len(listed)} segments; a "
            f"server opens at most {MAX_SEGMENTS} (SQLite attaches at most that many databases): "
            "merge them with `convirt index compact --root ROOT`"
        )
    problems = [] if listed else ["it lists no segment"]
    for segment in listed:
        if segment.fingerprint != files.fingerprint or segment.info.get("dims") != files.info.get(
            "dims"
        ):
            problems.append(
                f"segment {segment.directory} holds vectors of another model (fingerprint "
                f"{segment.fingerprint}, dims {segment.info.get('dims')})"
            )
    changed = files.checksum_problem(DELETED_NAME)
    deleted = None if changed else load_array(files.deleted, DELETED_NAME, problems)
    if changed:
        problems.append(changed)
    if problems:
        raise CorruptVersionError(files.directory, problems)
    assert deleted is not None
    opened: list[OpenedVersion] = []
    try:
        for segment in listed:
            opened.append(open_checked(segment))
    except BaseException:
        for done in opened:
            done.db.close()
        raise
    parts = []
    for n, (segment, version) in enumerate(zip(listed, opened, strict=True)):
        gone = np.intersect1d(version.ids, deleted)
        fields = None
        if metadata.has_table(version.db, FIELD_TABLES):
            fields = lookup.meta_fields(version.db)
        parts.append(Segment(segment, version, f"s{n}", gone, fields, None))  # type: ignore[arg-type]
    return parts


def union_connection(parts: list[Segment]) -> sqlite3.Connection:
    """One connection with every segment's meta.sqlite attached (s0, s1, ...), temp.deleted and
    the TEMP VIEWs `images` and `duplicates` over their live rows; sets each part's tables."""
    conn = sqlite3.connect("file::memory:", uri=True, check_same_thread=False)
    try:
        for part in parts:
            path = part.files.meta_path
            conn.execute(
                f"ATTACH DATABASE ? AS {part.schema}", (f"file:{path}?mode=ro&immutable=1",)
            )
        conn.execute(f"CREATE TEMP TABLE {DELETED_TABLE} (id INTEGER PRIMARY KEY)")
        conn.executemany(
            f"INSERT INTO temp.{DELETED_TABLE} VALUES (?)",
            ((int(i),) for part in parts for i in part.deleted),
        )
        columns = ", ".join(COLUMNS)
        for view, selected in (("images", columns), ("duplicates", "path, id, duplicate_of")):
            conn.execute(f"CREATE TEMP VIEW {view} AS " + union(parts, view, selected))
        for part in parts:
            stored = lookup.stored_tables(part.opened.db) if part.fields is not None else None
            part.tables = FieldTables(conn, stored, schema=part.schema)
    except BaseException:
        conn.close()
        raise
    return conn


def union(
    parts: list[Segment], table: str, columns: str, tables: Mapping[str, str] | None = None
) -> str:
    """SELECT ... UNION ALL ... of one table in every segment (`tables`: schema -> its name there,
    for those that hold it), the deleted rows left out."""
    arms = []
    for part in parts:
        name = table if tables is None else tables.get(part.schema)
        if name is None:
            continue
        live = (
            f" WHERE id NOT IN (SELECT id FROM temp.{DELETED_TABLE})" if len(part.deleted) else ""
        )
        arms.append(f"SELECT {columns} FROM {part.schema}.{name}{live}")
    return " UNION ALL ".join(arms)


def field_views(conn: sqlite3.Connection, parts: list[Segment]) -> dict[str, str]:
    """field -> a TEMP VIEW (id, value, number) over its stored table in every segment holding it:
    what group_members looks keys up in."""
    tables: dict[str, dict[str, str]] = {}
    for part in parts:
        for field, table in part.tables.stored.items():
            tables.setdefault(field, {})[part.schema] = table
    views = {}
    for n, (field, where) in enumerate(sorted(tables.items())):
        views[field] = f"field_view_{n}"
        conn.execute(
            f"CREATE TEMP VIEW {views[field]} AS " + union(parts, "", "id, value, number", where)
        )
    return views
