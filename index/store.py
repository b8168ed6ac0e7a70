"""The read API the service uses: open the current version, search it, read metadata and thumbnails.

    store = open_current("/data/index", expected_fingerprint=bundle.fingerprint)
    hits = store.search_text_vectors(embedder.embed_texts(["pleural effusion"]).vectors, k=10)
    store.get(hits[0][0].id)["report"], store.thumbnail(hits[0][0].id)
    if store.has_newer_version(): store = open_current(...)   # then close the old one

An IndexStore reads one immutable version, so it never changes under a reader; searches may run
from several threads at once. Opening one checks it first (FAISS loads, `PRAGMA quick_check`, the
counts of FAISS, the vectors and SQLite agree): a damaged version raises CorruptVersionError.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import checks, faiss_index, layout, metadata
from .errors import IndexStoreError, check_fingerprint
from .version import VersionFiles, read_version

Filters = Mapping[str, Any]
OVERFETCH = 4  # for structures that cannot filter inside FAISS: fetch k * OVERFETCH, then filter


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # inner product of L2-normalised vectors: the cosine similarity


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
        query = np.asarray(self.vectors[space][row : row + 1], dtype=np.float32)
        hits = self._search(space, query, k + 1, filters)[0]
        return [hit for hit in hits if hit.id != image_id][:k]

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

    def _search(
        self, space: str, vectors: np.ndarray, k: int, filters: Filters | None
    ) -> list[list[Hit]]:
        if space not in self.indexes:
            raise ValueError(f"space must be 'joint' or 'encoder', not {space!r}")
        queries = self._queries(space, vectors)
        if k < 1 or self.count == 0:
            return [[] for _ in queries]
        if not filters:
            return self._faiss_search(space, queries, min(k, self.count))
        with self.lock:
            allowed = metadata.filtered_ids(self.db, filters, self.meta_fields)
            allowed = np.asarray(allowed, dtype=np.int64)
        if len(allowed) == 0:
            return [[] for _ in queries]
        params = faiss_index.search_params(self.indexes[space], allowed)
        if params is not None:
            return self._faiss_search(space, queries, min(k, len(allowed)), params)
        return self._overfetch(space, queries, k, set(allowed.tolist()))

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
