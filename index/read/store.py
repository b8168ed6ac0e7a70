"""The read API the service uses: open the current version, search it, read metadata and thumbnails.

    store = open_current("/data/index", expected_fingerprint=bundle.fingerprint)
    hits = store.search_text_vectors(embedder.embed_texts(["pleural effusion"]).vectors, k=10)
    store.get(hits[0][0].id)["report"], store.thumbnail(hits[0][0].id)
    if store.has_newer_version(): store = open_current(...)   # then close the old one

One steerable query: filters (a value, a list of values, a {"gte", "lte"} range), keywords the
report must (not) contain, ids to leave out, all applied inside FAISS:

    store.search("joint", vector, k=10, filters={"modality": ["CT", "MR"], "age": {"gte": 40}},
                 keywords=Keywords(must=("effusion",), must_not=("pneumothorax",)), exclude={7})
    store.facets()   # what those filters can ask for: values with counts, or a low..high range

An IndexStore reads one immutable version, so it never changes under a reader; searches may run
from several threads at once. Opening one checks it first (FAISS loads, the SQLite headers, the
counts of FAISS, the vectors and SQLite agree: index/read/opening.py): a damaged version raises
CorruptVersionError. A version written since issue 25 holds its facets and per-field tables
(index/write/lookups.py) and its thumbnails apart (thumbs.sqlite); older ones are served by
scanning their rows once, as before. A version of several segments (format 2) is served by
index/read/segmented.py's SegmentedStore, with the same answers.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from convirt.findings import query_terms

from .. import layout, metadata
from ..errors import CorruptVersionError, IndexStoreError, check_fingerprint
from ..version import VersionFiles, read_version
from . import hybrid, lookup, search, sentences
from . import keywords as report_keywords
from .facets import Facet, facets, stored_facets
from .filters import FieldTables, filtered_ids
from .hybrid import TextRanking
from .keywords import Keywords, check_keywords, narrowed
from .opening import open_checked
from .search import Hit
from .timings import FAISS, FILTER, REPORTS, Timings

Filters = Mapping[str, Any]


class IndexStore:
    """One published version of an index root, opened for reading."""

    def __init__(self, root: Path, files: VersionFiles):
        if files.info.get("shard"):
            shard = files.info["shard"]
            raise IndexStoreError(
                f"{files.directory} is shard {shard['index']}/{shard['count']} of a sharded "
                "build: merge the shards (`convirt index merge`) and open the merged index"
            )
        self.root = Path(root)
        self.files = files
        self.info = files.info
        self.lock = threading.Lock()
        self._groups: dict[str, dict[str, list[int]]] = {}  # group_members' maps, per field
        # built on first use, then kept: the reports' FTS5 index (with its own lock) and facets
        self._reports: sqlite3.Connection | None = None
        self._reports_lock = threading.Lock()
        self._facets: list[Facet] | None = None
        # the reports' sentences and their words by status (index.read.sentences); None in versions
        # written before them, which rank text queries by the image alone
        self.sentences: sentences.SentenceSpace | None = None
        self._open(files)

    def _open(self, files: VersionFiles) -> None:
        """Open and check every file before anyone searches it: CorruptVersionError. A format-2
        version (several segments) is opened by index.read.segmented.SegmentedStore instead."""
        opened = open_checked(files)
        self.indexes = opened.indexes
        self.ids = opened.ids
        self.vectors = opened.vectors
        self.db = opened.db
        self.report_terms = report_keywords.ReportTerms(
            self.db
        )  # the reports' words by status (FTS5)
        # the manifest fields a filter may name, read once: a version never changes
        self.meta_fields = lookup.meta_fields(self.db)
        # field -> its table, stored at publish (None: a version written before them)
        self._stored_tables = lookup.stored_tables(self.db)
        self._thumbs_apart = not metadata.has_column(self.db, "images", "thumbnail")
        self._field_tables = FieldTables(self.db, self._stored_tables)  # per-field indexes
        if files.info.get("sentences") and sentences.has_space(self.db):
            try:
                self.sentences = sentences.SentenceSpace(files.directory, self.db)
            except (OSError, ValueError, sqlite3.Error) as err:
                self.db.close()
                raise CorruptVersionError(
                    files.directory, [f"the report sentences cannot be read: {err}"]
                ) from err

    @property
    def version(self) -> str:
        return self.files.name

    @property
    def fingerprint(self) -> str:
        return self.files.fingerprint

    @property
    def count(self) -> int:
        return len(self.ids)

    def has_newer_version(self) -> bool:
        """Whether CURRENT now names another version than the one this store reads."""
        current = layout.read_current(self.root)
        return current is not None and current != self.version

    def search_text_vectors(
        self, vectors: np.ndarray, k: int = 10, filters: Filters | None = None
    ) -> list[list[Hit]]:
        """Images nearest to text embeddings u/|u| (joint space), per query."""
        return self._search("joint", vectors, k, filters)

    def search_image_vectors(
        self,
        vectors: np.ndarray,
        k: int = 10,
        filters: Filters | None = None,
        space: str = "encoder",
    ) -> list[list[Hit]]:
        """Images nearest to image embeddings: encoder features h (default) or joint v."""
        return self._search(space, vectors, k, filters)

    def similar_to_id(
        self, image_id: int, k: int = 10, filters: Filters | None = None, space: str = "encoder"
    ) -> list[Hit]:
        """The k images nearest to an indexed image, itself excluded."""
        row = self._row(image_id)
        return self.search(space, self.vectors[space][row], k, filters, exclude=(image_id,))

    def search(
        self,
        space: str,
        vector: np.ndarray,
        k: int,
        filters: Filters | None = None,
        keywords: Keywords | None = None,
        exclude: Collection[int] = (),
        timings: Timings | None = None,
    ) -> list[Hit]:
        """At most k images nearest to one query vector, best first.

        space: "joint" (text or image v) or "encoder" (image h); the vector is L2-normalised here.
        Only images passing every filter and the keywords are returned, never an id in
        `exclude`; all three restrict the search inside FAISS. A filter or keyword the index
        cannot run raises FilterError (the client's mistake); a vector of the wrong dimension
        raises ValueError (the caller embedded with another model). `timings`: where the
        filter and FAISS stages are added up."""
        query = np.asarray(vector, dtype=np.float32)
        if query.ndim != 1:
            raise ValueError(
                f"search takes one 1-D query vector, got shape {query.shape}: use "
                "search_text_vectors / search_image_vectors for a batch"
            )
        return self._search(space, query[None], k, filters, keywords, exclude, timings)[0]

    def rank_text(
        self,
        vector: np.ndarray,
        text: str,
        k: int,
        filters: Filters | None = None,
        keywords: Keywords | None = None,
        exclude: Collection[int] = (),
        mode: str = "hybrid",
        fusion: str = "weighted",
        timings: Timings | None = None,
    ) -> TextRanking | None:
        """A text query ranked with the reports (index.read.hybrid): mode `hybrid` (image, report
        sentences and words) or `report` (the report alone); None where this version holds no
        report sentences (the caller ranks by the image). Filters, keywords and exclusions
        restrict every kind of evidence, as in `search`."""
        if mode not in ("hybrid", "report") or fusion not in hybrid.FUSIONS:
            raise ValueError(f"mode {mode!r} / fusion {fusion!r}: see index.read.hybrid")
        if self.sentences is None:
            return None
        timings = timings or Timings()
        query = self._queries("joint", vector)[0]
        terms = query_terms(text)
        allowed = self._allowed(filters, keywords, timings)
        excluded = search.held(self.ids, exclude)

        passes = search.passing(allowed, excluded)
        with timings.stage(REPORTS), self.lock:
            lexical, matches = hybrid.lexical_evidence(self.report_terms, terms, passes)
        image_hits = []
        if mode == "hybrid" and self.count:
            reads = max(hybrid.IMAGES_READ, k)
            with timings.stage(FAISS):
                image_hits = self._nearest("joint", query[None], reads, allowed, excluded)[0]
        also = [*lexical[0].tolist(), *(hit.id for hit in image_hits)]
        with timings.stage(REPORTS):
            found = hybrid.sentence_evidence(self.sentences, query, terms, passes, also)
            reports = hybrid.Reports(found, lexical, matches)
            return TextRanking(
                self.sentences,
                lambda ids: self.vectors_of(ids, "joint"),
                query,
                reports,
                image_hits,
                mode,
                fusion,
            )

    def similarity(self, space: str, vector: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        """The cosine of one query vector (normalised as `search` does) to the stored vectors of
        these ids, in their order; KeyError naming the first id this version does not hold."""
        return self.vectors_of(ids, space) @ self._queries(space, vector)[0]

    def vectors_of(self, ids: Sequence[int], space: str) -> np.ndarray:
        """The stored vectors (len(ids) x dim, float32) of indexed images, in the order given;
        KeyError naming the first id this version does not hold."""
        if space not in self.vectors:
            raise ValueError(f"space must be 'joint' or 'encoder', not {space!r}")
        rows = self._rows(ids)
        return np.asarray(self.vectors[space][rows], dtype=np.float32)

    def group_members(
        self,
        field: str,
        keys: Collection[str],
        filters: Filters | None = None,
        keywords: Keywords | None = None,
        timings: Timings | None = None,
    ) -> dict[str, list[int]]:
        """Ids of the images whose manifest field `field` holds one of `keys` (a study or patient
        id) and that pass the filters and keywords, by key: every image of a group. Each key is
        looked up in the field's stored table; in a version written before those, in the field's
        value -> ids map, read once per version."""
        if not keys or field not in self.meta_fields:
            return {}
        with self.lock:
            if self._stored_tables is not None:
                table = self._stored_tables.get(field)
                members = lookup.members(self.db, table, list(keys)) if table else {}
            else:
                if field not in self._groups:
                    self._groups[field] = lookup.field_values(self.db, field)
                groups = self._groups[field]
                members = {key: groups[key] for key in keys if key in groups}
        allowed = self._allowed(filters, keywords, timings)
        if allowed is None:
            return members
        kept = {key: search.among(ids, allowed) for key, ids in members.items()}
        return {key: ids for key, ids in kept.items() if ids}

    def facets(self, max_values: int = 50) -> list[Facet]:
        """What filters can ask for: modality, view and every manifest field, each with its
        values and image counts (at most `max_values`, most frequent first) or, where every value
        is a number or an ISO date, its range. Read once, as stored at publish (at most
        STORED_VALUES values a field), or computed from every row in an older version."""
        if max_values < 0:
            raise ValueError(f"max_values must be 0 or more, got {max_values}")
        with self.lock:
            if self._facets is None:
                stored = self._stored_facets()
                self._facets = facets(self.db, self.meta_fields) if stored is None else stored
            cached = self._facets
        return [replace(facet, values=facet.values[:max_values]) for facet in cached]

    def get(self, image_id: int) -> dict[str, Any] | None:
        """Metadata of one image (no thumbnail), with the other paths of the same content."""
        return self.get_many([image_id]).get(int(image_id))

    def get_many(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        with self.lock:
            rows = lookup.get_rows(self.db, [int(i) for i in ids])
            return {
                i: {**row.as_dict(), "duplicates": lookup.duplicate_paths(self.db, i)}
                for i, row in rows.items()
            }

    def thumbnail(self, image_id: int) -> bytes | None:
        """The JPEG thumbnail (longest side 128 px), or None for an unknown id."""
        with self.lock:
            return lookup.thumbnail(self.db, int(image_id), self._thumbs_apart)

    def close(self) -> None:
        with self._reports_lock:
            if self._reports is not None:
                self._reports.close()
                self._reports = None
        self.db.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------

    def _row(self, image_id: int) -> int:
        return int(self._rows([image_id])[0])

    def _rows(self, ids: Sequence[int]) -> np.ndarray:
        """The rows of ids in self.ids; KeyError naming the first unknown one."""
        return search.rows_of(self.ids, ids, self.version)

    def _search(
        self,
        space: str,
        vectors: np.ndarray,
        k: int,
        filters: Filters | None,
        keywords: Keywords | None = None,
        exclude: Collection[int] = (),
        timings: Timings | None = None,
    ) -> list[list[Hit]]:
        if space not in self.indexes:
            raise ValueError(f"space must be 'joint' or 'encoder', not {space!r}")
        queries = self._queries(space, vectors)
        if k < 1 or self.count == 0:
            return [[] for _ in queries]
        timings = timings or Timings()
        excluded = search.held(self.ids, exclude)
        allowed = self._allowed(filters, keywords, timings)
        with timings.stage(FAISS):
            return self._nearest(space, queries, k, allowed, excluded)

    def _nearest(self, space, queries, k, allowed, excluded) -> list[list[Hit]]:
        """search.search_within on this version's index of `space` (segments: SegmentedStore)."""
        return search.search_within(self.indexes[space], queries, k, allowed, excluded)

    def _stored_facets(self) -> list[Facet] | None:
        return stored_facets(self.db)

    def _filtered(self, filters: Filters) -> list[int]:
        """The ids passing the filters (hold self.lock)."""
        return filtered_ids(self.db, filters, self.meta_fields, self._field_tables)

    def _allowed(
        self, filters: Filters | None, keywords: Keywords | None, timings: Timings | None = None
    ) -> np.ndarray | None:
        """The sorted ids passing the filters and the keywords; None where neither restricts."""
        if keywords is not None:
            check_keywords(keywords)  # before any work: a client error is cheap
        if not filters and not keywords:
            return None
        with (timings or Timings()).stage(FILTER):
            return self._passing(filters, keywords)

    def _passing(self, filters: Filters | None, keywords: Keywords | None) -> np.ndarray:
        allowed = None
        if filters:
            with self.lock:
                found = self._filtered(filters)
            allowed = np.unique(np.asarray(found, dtype=np.int64))
            if len(allowed) == 0:
                return allowed
        if keywords:
            must, must_not = self._keyword_ids(keywords)
            allowed = narrowed(allowed, must, must_not, self.ids)
        return allowed

    def _keyword_ids(self, keywords: Keywords) -> tuple[set[int] | None, set[int]]:
        """keyword_ids on what the reports assert (index.read.sentences), or, in versions
        written before report sentences, on what they mention."""
        if self.sentences is not None:
            with self.lock:
                return report_keywords.asserted_ids(self.report_terms, keywords)
        with self._reports_lock:
            return report_keywords.keyword_ids(self._report_index(), keywords)

    def _report_index(self) -> sqlite3.Connection:
        """The reports' FTS5 index, built on the first keyword query; hold _reports_lock."""
        if self._reports is None:
            with self.lock:  # lock order: _reports_lock, then lock (never the other way)
                reported = metadata.reports(self.db)
            self._reports = report_keywords.report_index(reported)
        return self._reports

    def _queries(self, space: str, vectors: np.ndarray) -> np.ndarray:
        return search.normalised(vectors, self.info["dims"][space], space)


def open_current(root: str | Path, expected_fingerprint: str | None = None) -> IndexStore:
    """The version CURRENT names; refused when it was built with another model."""
    root = Path(root)
    files = read_version(layout.current_version_dir(root))
    where = f"index {root} (version {files.name})"
    check_fingerprint(where, files.fingerprint, expected_fingerprint)
    from .segmented import open_version  # it builds on IndexStore

    return open_version(root, files)
