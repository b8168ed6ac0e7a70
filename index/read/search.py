"""The FAISS part of a search: query vectors normalised, the nearest ids among the allowed ones
(inside FAISS where the structure can filter, else by over-fetching), as Hits best first."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import faiss
import numpy as np

from .. import faiss_index
from ..errors import FilterError

if TYPE_CHECKING:
    from .hybrid import Evidence

OVERFETCH = 4  # a search that must drop hits reads k * OVERFETCH, then OVERFETCH times more
T = TypeVar("T")


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # inner product of L2-normalised vectors: the cosine similarity (text
    # queries ranked with their reports: the fused score, index.read.hybrid)
    evidence: Evidence | None = field(default=None, compare=False)


def normalised(vectors: np.ndarray, dim: int, space: str) -> np.ndarray:
    """Query vectors as an N x dim float32 array of unit rows; ValueError for another dimension."""
    queries = np.asarray(vectors, dtype=np.float32)
    queries = queries.reshape(1, -1) if queries.ndim == 1 else queries
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(
            f"query vectors must be N x {dim} for the {space} space, got {vectors.shape}: "
            "embed with the model bundle this index was built with"
        )
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries / np.maximum(norms, 1e-12))


def search_within(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
    excluded: np.ndarray,
) -> list[list[Hit]]:
    """The k nearest hits per query among the `allowed` ids (None: all), none of `excluded`."""
    count = int(index.ntotal)
    if allowed is None:
        if len(excluded) == 0:
            return deep_search(index, queries, min(k, count))
        found = faiss_index.excluding_search(index, queries, min(k, count), excluded)
        if found is not None:
            return as_hits(*found)
        # at most len(excluded) of the nearest k + len(excluded) are left out
        drop = set(excluded.tolist())
        fetched = deep_search(index, queries, min(count, k + len(drop)))
        return [[hit for hit in hits if hit.id not in drop][:k] for hits in fetched]
    if len(excluded):
        allowed = np.setdiff1d(allowed, excluded, assume_unique=True)
    if len(allowed) == 0:
        return [[] for _ in queries]
    found = faiss_index.filtered_search(index, queries, min(k, len(allowed)), allowed)
    if found is not None:
        return as_hits(*found)
    params = faiss_index.search_params(index, allowed)
    if params is not None:
        return faiss_search(index, queries, min(k, len(allowed)), params)
    return overfetch(index, queries, k, set(allowed.tolist()))


def faiss_search(
    index: faiss.Index, queries: np.ndarray, k: int, params: faiss.SearchParameters | None = None
) -> list[list[Hit]]:
    return as_hits(*index.search(queries, k, params=params))


def deep_search(index: faiss.Index, queries: np.ndarray, k: int) -> list[list[Hit]]:
    """The k nearest without a filter, searched as deep as k needs (faiss_index.depth_params)."""
    return faiss_search(index, queries, k, faiss_index.depth_params(index, k))


def as_hits(scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
    """FAISS's answer (scores, ids; -1 where fewer were found) as Hits per query."""
    return [
        [Hit(int(i), float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
        for row_s, row_i in zip(scores, ids, strict=True)
    ]


def overfetch(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: set[int]
) -> list[list[Hit]]:
    """For structures that cannot filter inside FAISS: read the nearest hits, widening, until k
    are allowed or every vector was read."""

    def nearest(query: np.ndarray) -> Callable[[int], list[Hit]]:
        return lambda fetch: [
            h for h in deep_search(index, query[None], fetch)[0] if h.id in allowed
        ]

    count = int(index.ntotal)
    found = (
        widening(nearest(query), k * OVERFETCH, count, lambda hits: len(hits) >= k)
        for query in queries
    )
    return [hits[:k] for hits in found]


def widening(read: Callable[[int], T], first: int, most: int, enough: Callable[[T], bool]) -> T:
    """The one over-fetch loop: read(n) for n = first, then OVERFETCH times more, until enough()
    says what it read is enough or n reached `most`. Hits that a filter or a grouping drops are
    made up by reading more: here for filters a structure cannot run inside FAISS, in the
    service (service/search/find.py) for groups a search must fill."""
    fetch = min(first, most)
    while True:
        found = read(fetch)
        if fetch >= most or enough(found):
            return found
        fetch = min(fetch * OVERFETCH, most)


def passing(allowed: np.ndarray | None, excluded: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A mask maker: per id, whether it is allowed (None: all are) and not excluded."""

    def passes(ids: np.ndarray) -> np.ndarray:
        mask = np.ones(len(ids), bool)
        if allowed is not None:
            mask &= np.isin(ids, allowed)
        if len(excluded):
            mask &= ~np.isin(ids, excluded)
        return mask

    return passes


def held(ids: np.ndarray, exclude: Collection[int]) -> np.ndarray:
    """The sorted ids of `exclude` that a version holding `ids` (sorted) holds."""
    if len(exclude) == 0:
        return np.empty(0, dtype=np.int64)
    try:
        wanted = np.unique(np.asarray([int(i) for i in exclude], dtype=np.int64))
    except (TypeError, ValueError, OverflowError):
        raise FilterError(
            "exclude holds image ids: integers from 0 to 2**63 - 1, as search results give"
        ) from None
    rows = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return wanted[ids[rows] == wanted]


def among(ids: Sequence[int], allowed: np.ndarray) -> list[int]:
    """The ids that are in `allowed` (sorted), in the order given."""
    wanted = np.asarray(ids, dtype=np.int64)
    if len(allowed) == 0:
        return []
    rows = np.minimum(np.searchsorted(allowed, wanted), len(allowed) - 1)
    return wanted[allowed[rows] == wanted].tolist()


def rows_of(ids: np.ndarray, wanted: Sequence[int], version: str) -> np.ndarray:
    """The rows of several ids in a version's sorted `ids`; KeyError naming the first unknown."""
    asked = np.asarray([int(i) for i in wanted], dtype=np.int64)
    rows = np.searchsorted(ids, asked)
    found = rows < len(ids)
    found[found] = ids[rows[found]] == asked[found]
    if not found.all():
        missing = int(asked[np.argmin(found)])
        raise KeyError(f"image id {missing} is not in index version {version}")
    return rows
