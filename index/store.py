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
from several threads at once. Opening one checks it first (FAISS loads, `PRAGMA quick_check`, the
counts of FAISS, the vectors and SQLite agree): a damaged version raises CorruptVersionError.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from convirt.findings import query_terms

from . import checks, faiss_index, hybrid, layout, metadata, sentences
from .errors import CorruptVersionError, FilterError, IndexStoreError, check_fingerprint
from .hybrid import Evidence, TextRanking
from .metadata import Facet, Keywords
from .version import VersionFiles, read_version

__all__ = [
    "Facet",
    "FilterError",
    "Filters",
    "Hit",
    "IndexStore",
    "Keywords",
    "open_current",
    "open_version",
]

Filters = Mapping[str, Any]
OVERFETCH = 4  # for structures that cannot filter inside FAISS: fetch k * OVERFETCH, then filter


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # inner product of L2-normalised vectors: the cosine similarity (text
    # queries ranked with their reports: the fused score, index.hybrid)
    evidence: Evidence | None = field(default=None, compare=False)


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
        # every file is opened and checked before anyone searches it: CorruptVersionError
        opened = checks.open_checked(files)
        self.indexes = opened.indexes
        self.ids = opened.ids
        self.vectors = opened.vectors
        self.db = opened.db
        self.lock = threading.Lock()
        # the manifest fields a filter may name, read once: a version never changes
        self.meta_fields = metadata.meta_fields(self.db)
        self._groups: dict[str, dict[str, list[int]]] = {}  # group_members' maps, per field
        # built on first use, then kept: the reports' FTS5 index (with its own lock) and facets
        self._reports: sqlite3.Connection | None = None
        self._reports_lock = threading.Lock()
        self._facets: list[Facet] | None = None
        self._field_tables = metadata.FieldTables(self.db)  # filters' per-field indexes
        # the reports' sentences and their words by status (index.sentences); None in versions
        # written before them, which rank text queries by the image alone
        self.sentences: sentences.SentenceSpace | None = None
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
    ) -> list[Hit]:
        """At most k images nearest to one query vector, best first.

        space: "joint" (text or image v) or "encoder" (image h); the vector is L2-normalised here.
        Only images passing every filter and the keywords are returned, never an id in
        `exclude`; all three restrict the search inside FAISS. A filter or keyword the index
        cannot run raises FilterError (the client's mistake); a vector of the wrong dimension
        raises ValueError (the caller embedded with another model)."""
        query = np.asarray(vector, dtype=np.float32)
        if query.ndim != 1:
            raise ValueError(
                f"search takes one 1-D query vector, got shape {query.shape}: use "
                "search_text_vectors / search_image_vectors for a batch"
            )
        return self._search(space, query[None], k, filters, keywords, exclude)[0]

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
    ) -> TextRanking | None:
        """A text query ranked with the reports (index.hybrid): mode `hybrid` (image, report
        sentences and words) or `report` (the report alone); None where this version holds no
        report sentences (the caller ranks by the image). Filters, keywords and exclusions
        restrict every kind of evidence, as in `search`."""
        if mode not in ("hybrid", "report") or fusion not in hybrid.FUSIONS:
            raise ValueError(f"mode {mode!r} / fusion {fusion!r}: see index.hybrid")
        if self.sentences is None:
            return None
        query = self._queries("joint", vector)[0]
        terms = query_terms(text)
        allowed = self._allowed(filters, keywords)
        excluded = self._excluded(exclude)

        def passes(ids: np.ndarray) -> np.ndarray:
            mask = np.ones(len(ids), bool)
            if allowed is not None:
                mask &= np.isin(ids, allowed)
            if len(excluded):
                mask &= ~np.isin(ids, excluded)
            return mask

        with self.lock:
            lexical, matches = hybrid.lexical_evidence(self.db, terms, passes)
        image_hits = []
        if mode == "hybrid" and self.count:
            reads = max(hybrid.IMAGES_READ, k)
            image_hits = self._search_within("joint", query[None], reads, allowed, excluded)[0]
        also = [*lexical[0].tolist(), *(hit.id for hit in image_hits)]
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
    ) -> dict[str, list[int]]:
        """Ids of the images whose manifest field `field` holds one of `keys` (a study or patient
        id) and that pass the filters and keywords, by key: every image of a group, not only
        those a search happened to reach. The field's value -> ids map is read once per version
        (one scan, then a dictionary lookup per key)."""
        if not keys or field not in self.meta_fields:
            return {}
        with self.lock:
            if field not in self._groups:
                self._groups[field] = metadata.field_values(self.db, field)
            groups = self._groups[field]
        members = {key: groups[key] for key in keys if key in groups}
        allowed = self._allowed(filters, keywords)
        if allowed is None:
            return members
        kept = {}
        for key, ids in members.items():
            ids_array = np.asarray(ids, dtype=np.int64)
            rows = np.minimum(np.searchsorted(allowed, ids_array), max(len(allowed) - 1, 0))
            passing = ids_array[(allowed[rows] == ids_array)] if len(allowed) else ids_array[:0]
            if len(passing):
                kept[key] = passing.tolist()
        return kept

    def facets(self, max_values: int = 50) -> list[Facet]:
        """What filters can ask for: modality, view and every manifest field, each with its
        values and image counts (at most `max_values`, most frequent first) or, where every value
        is a number or an ISO date, its range. Computed once: a version never changes."""
        if max_values < 0:
            raise ValueError(f"max_values must be 0 or more, got {max_values}")
        with self.lock:
            if self._facets is None:
                self._facets = metadata.facets(self.db, self.meta_fields)
            cached = self._facets
        return [replace(facet, values=facet.values[:max_values]) for facet in cached]

    def get(self, image_id: int) -> dict[str, Any] | None:
        """Metadata of one image (no thumbnail), with the other paths of the same content."""
        return self.get_many([image_id]).get(int(image_id))

    def get_many(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        with self.lock:
            rows = metadata.get_rows(self.db, [int(i) for i in ids])
            return {
                i: {**row.as_dict(), "duplicates": metadata.duplicate_paths(self.db, i)}
                for i, row in rows.items()
            }

    def thumbnail(self, image_id: int) -> bytes | None:
        """The JPEG thumbnail (longest side 128 px), or None for an unknown id."""
        with self.lock:
            return metadata.thumbnail(self.db, int(image_id))

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
        row = int(np.searchsorted(self.ids, image_id))
        if row >= len(self.ids) or self.ids[row] != image_id:
            raise KeyError(f"image id {image_id} is not in index version {self.version}")
        return row

    def _rows(self, ids: Sequence[int]) -> np.ndarray:
        """The rows of several ids at once; KeyError naming the first unknown one."""
        wanted = np.asarray([int(i) for i in ids], dtype=np.int64)
        rows = np.searchsorted(self.ids, wanted)
        found = rows < len(self.ids)
        found[found] = self.ids[rows[found]] == wanted[found]
        if not found.all():
            missing = int(wanted[np.argmin(found)])
            raise KeyError(f"image id {missing} is not in index version {self.version}")
        return rows

    def _search(
        self,
        space: str,
        vectors: np.ndarray,
        k: int,
        filters: Filters | None,
        keywords: Keywords | None = None,
        exclude: Collection[int] = (),
    ) -> list[list[Hit]]:
        if space not in self.indexes:
            raise ValueError(f"space must be 'joint' or 'encoder', not {space!r}")
        queries = self._queries(space, vectors)
        if k < 1 or self.count == 0:
            return [[] for _ in queries]
        excluded = self._excluded(exclude)
        return self._search_within(space, queries, k, self._allowed(filters, keywords), excluded)

    def _search_within(
        self,
        space: str,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        excluded: np.ndarray,
    ) -> list[list[Hit]]:
        """_search once the allowed ids (None: all) and the excluded ones are known."""
        if allowed is None:
            if len(excluded) == 0:
                return self._faiss_search(space, queries, min(k, self.count))
            # at most len(excluded) of the nearest k + len(excluded) are left out
            drop = set(excluded.tolist())
            fetched = self._faiss_search(space, queries, min(self.count, k + len(drop)))
            return [[hit for hit in hits if hit.id not in drop][:k] for hits in fetched]
        if len(excluded):
            allowed = np.setdiff1d(allowed, excluded, assume_unique=True)
        if len(allowed) == 0:
            return [[] for _ in queries]
        params = faiss_index.search_params(self.indexes[space], allowed)
        if params is not None:
            return self._faiss_search(space, queries, min(k, len(allowed)), params)
        return self._overfetch(space, queries, k, set(allowed.tolist()))

    def _allowed(self, filters: Filters | None, keywords: Keywords | None) -> np.ndarray | None:
        """The sorted ids passing the filters and the keywords; None where neither restricts."""
        if keywords is not None and not isinstance(keywords, Keywords):
            raise TypeError(f"keywords must be index.store.Keywords, not {type(keywords).__name__}")
        if keywords:
            metadata.check_keywords(keywords)  # before any work: a client error is cheap
        if not filters and not keywords:
            return None
        allowed = None
        if filters:
            with self.lock:
                found = metadata.filtered_ids(
                    self.db, filters, self.meta_fields, self._field_tables
                )
            allowed = np.unique(np.asarray(found, dtype=np.int64))
            if len(allowed) == 0:
                return allowed
        if keywords:
            must, must_not = self._keyword_ids(keywords)
            if must is not None:
                must_ids = np.fromiter(must, dtype=np.int64, count=len(must))
                allowed = (
                    np.unique(must_ids)
                    if allowed is None
                    else np.intersect1d(allowed, must_ids, assume_unique=True)
                )
            if allowed is None:
                allowed = np.asarray(self.ids, dtype=np.int64)
            if must_not:
                drop = np.fromiter(must_not, dtype=np.int64, count=len(must_not))
                allowed = np.setdiff1d(allowed, drop, assume_unique=True)
        return allowed

    def _keyword_ids(self, keywords: Keywords) -> tuple[set[int] | None, set[int]]:
        """metadata.keyword_ids on what the reports assert (index.sentences), or, in versions
        written before report sentences, on what they mention."""
        if self.sentences is not None:
            with self.lock:
                return metadata.keyword_ids(self.db, keywords, metadata.ASSERTED)
        with self._reports_lock:
            return metadata.keyword_ids(self._report_index(), keywords)

    def _report_index(self) -> sqlite3.Connection:
        """The reports' FTS5 index, built on the first keyword query; hold _reports_lock."""
        if self._reports is None:
            with self.lock:  # lock order: _reports_lock, then lock (never the other way)
                rows = metadata.reports(self.db)
            self._reports = metadata.report_index(rows)
        return self._reports

    def _excluded(self, exclude: Collection[int]) -> np.ndarray:
        """The sorted ids of `exclude` that this version holds."""
        if len(exclude) == 0:
            return np.empty(0, dtype=np.int64)
        try:
            wanted = np.unique(np.asarray([int(i) for i in exclude], dtype=np.int64))
        except (TypeError, ValueError, OverflowError):
            raise FilterError(
                "exclude holds image ids: integers from 0 to 2**63 - 1, as search results give"
            ) from None
        rows = np.minimum(np.searchsorted(self.ids, wanted), len(self.ids) - 1)
        return wanted[self.ids[rows] == wanted]

    def _queries(self, space: str, vectors: np.ndarray) -> np.ndarray:
        queries = np.asarray(vectors, dtype=np.float32)
        queries = queries.reshape(1, -1) if queries.ndim == 1 else queries
        dim = self.info["dims"][space]
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(
                f"query vectors must be N x {dim} for the {space} space, got {vectors.shape}: "
                "embed with the model bundle this index was built with"
            )
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        return np.ascontiguousarray(queries / np.maximum(norms, 1e-12))

    def _faiss_search(self, space, queries, k, params=None) -> list[list[Hit]]:
        scores, ids = self.indexes[space].search(queries, k, params=params)
        return [
            [Hit(int(i), float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def _overfetch(self, space, queries, k, allowed: set[int]) -> list[list[Hit]]:
        results = []
        for query in queries:
            fetch = min(self.count, k * OVERFETCH)
            while True:
                hits = [
                    h for h in self._faiss_search(space, query[None], fetch)[0] if h.id in allowed
                ]
                if len(hits) >= k or fetch >= self.count:
                    break
                fetch = min(self.count, fetch * OVERFETCH)
            results.append(hits[:k])
        return results


def open_current(root: str | Path, expected_fingerprint: str | None = None) -> IndexStore:
    """The version CURRENT names; refused when it was built with another model."""
    root = Path(root)
    files = read_version(layout.current_version_dir(root))
    check_fingerprint(
        f"index {root} (version {files.name})", files.fingerprint, expected_fingerprint
    )
    return IndexStore(root, files)


def open_version(
    root: str | Path, version: str, expected_fingerprint: str | None = None
) -> IndexStore:
    """A given published version (e.g. to compare or roll back)."""
    root = Path(root)
    directory = layout.versions_dir(root) / version
    if not directory.is_dir():
        raise IndexStoreError(f"{root} has no version {version}: see `convirt index info`")
    files = read_version(directory)
    check_fingerprint(
        f"index {root} (version {files.name})", files.fingerprint, expected_fingerprint
    )
    return IndexStore(root, files)
