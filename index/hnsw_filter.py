"""Filtered search on an HNSW index: exact over the allowed images, or a graph search widened by
the filter's selectivity, whichever costs less.

Why: FAISS runs a filter inside the HNSW graph search (an IDSelector). The search walks the graph
as an unfiltered one would, keeps only allowed vertices as results, and stops once efSearch
vertices nearer than its next candidate were seen, allowed or not. So a filter passing a fraction
f of the images sees about f * efSearch allowed ones: at efSearch 128 on 100k synthetic archive
images (bench/archive_scale.py), a filter passing 0.43% found 28% of the true top 10, one passing
10% found 59% (docs/benchmarks.md, "Archive scale"). Two remedies, chosen per query by cost:

    exact     the allowed images' vectors, read in place from the graph's own storage (HNSW32,Flat
              keeps them as an IndexFlat), each scored as flat scores it (fvec inner products);
              the best k, ties by id: the same ids, in the same order, as a flat index gives.
              Cost: allowed images x d.
    widened   the graph search through a bitmap of the allowed rows, with efSearch =
              HNSW_EF_SEARCH / f**2 (f: the fraction of this index's images the filter passes;
              at most EF_SEARCH_MAX). One 1/f for the share of allowed vertices it sees; the other
              because filters follow what images show (CT, abdomen): their images lie apart from
              most queries, so the graph must be searched wider than f alone says. Cost: about
              efSearch graph steps.

A filter is scored exactly while that costs no more than the graph search would: a graph step
costs about GRAPH_STEP_COST exactly scored vectors, so while allowed <= GRAPH_STEP_COST x efSearch.
At 100k images that is up to about 23,000 allowed (10% and less: exact; CT's 36%: efSearch 988),
at 3,000 up to 2,250 (75%); no exact scan reads more than GRAPH_STEP_COST x
EF_SEARCH_MAX vectors (beyond, filters passing a few % of tens of millions of images, the graph
search runs capped and its recall is not measured: no HNSW index that size fits this box).

Reading deeper than the usual 10 (an exclusion list over-fetches k + its length; a grouped query
reads up to 2,000): FAISS searches at efSearch whatever k is, so 510 hits read at efSearch 128
held 0.85 of the true 510, and a search leaving out the 500 nearest (pages already seen) found
0.66 of the next 10. deep_ef_search adds one efSearch slot per hit beyond the usual 10: 0.98 (3.8
ms joint, 5.1 ms encoder, from 1.5 / 2.4). More than OVERFETCH_EXCLUDED_MAX left out (a
segment's deleted rows, reaching thousands) would make that search thousands deep: those run as
a filter over every other image instead (5% of 100k left out at random: recall 0.995 / 0.989 as
before, 2.2 / 2.1 ms instead of 3.9 / 8.8).

Measured on 100k synthetic archive images (bench/archive_scale.py, one thread, a loaded 2-core
box; docs/benchmarks.md "Archive scale"):
  - exact: 0.15 ms (430 allowed), 1.8 / 3.2 ms (10,000; joint / encoder), 11 / 28 ms (36,000);
    a graph step 2.7-5 us (joint), 3.9 us (encoder): 8-25 exactly scored vectors.
  - recall@10 of the graph search, joint: passing 10% (CT abdomen) at efSearch 1,024 / 2,048 /
    6,144 / 8,192: 0.79 / 0.81 / 0.95 / 0.98 (128 / f would be 1,280); passing 1.7%: 0.95 at
    8,192; passing 36% (CT): 0.95 at 356, 0.96-0.98 at 512, 1.0 at 2,048. A random 1% or 3% of
    the images (a filter unrelated to what they show): 0.99 at 1,024.
"""

from __future__ import annotations

import math
import weakref

import faiss
import numpy as np

EF_SEARCH_MAX = 16_384  # the widest a filtered graph search goes (efSearch)
OVERFETCH_EXCLUDED_MAX = 2_000  # more images left out than this run as a filter (see above)
GRAPH_STEP_COST = 10.0  # one efSearch slot of a graph search costs this many exactly scored vectors

_ROW_LOOKUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_hnsw_flat(index: faiss.Index) -> bool:
    """Whether `index` is an IndexIDMap(2) over an HNSW graph with flat storage."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap):
        return False
    inner = faiss.downcast_index(outer.index)
    return isinstance(inner, faiss.IndexHNSW) and isinstance(
        faiss.downcast_index(inner.storage), faiss.IndexFlat
    )


def widened_ef_search(ef_search: int, allowed: int, total: int) -> int:
    """efSearch for a graph search that `allowed` of `total` images may answer."""
    wanted = math.ceil(ef_search * (total / max(allowed, 1)) ** 2)
    return int(min(EF_SEARCH_MAX, max(ef_search, wanted)))


def deep_ef_search(ef_search: int, k: int, usual_k: int) -> int:
    """efSearch for reading the k nearest: one more for each hit beyond the usual_k a search
    reads (FAISS searches at efSearch whatever k is; see the module's docstring)."""
    return ef_search + max(0, k - usual_k)


def scored_exactly(allowed: int, total: int, ef_search: int) -> bool:
    """Whether a filter passing `allowed` of `total` images is cheaper to score exactly than
    by the graph search it would take."""
    return allowed <= GRAPH_STEP_COST * widened_ef_search(ef_search, allowed, total)


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray,
    ef_search: int,
    usual_k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest (scores, ids) per query among `allowed` ids; -1 ids where fewer exist."""
    lookup = _lookup(index)
    return _search_rows(index, lookup, queries, k, lookup.rows_of(allowed), ef_search, usual_k)


def search_excluding(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    excluded: np.ndarray,
    ef_search: int,
    usual_k: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The k nearest (scores, ids) per query, none of `excluded`, as a filter over every other
    image where more than OVERFETCH_EXCLUDED_MAX are left out; None where fewer are (reading
    k + len(excluded) and dropping them is cheaper)."""
    if len(excluded) <= OVERFETCH_EXCLUDED_MAX:
        return None
    lookup = _lookup(index)
    kept = np.ones(lookup.total, dtype=bool)
    kept[lookup.rows_of(excluded)] = False
    return _search_rows(index, lookup, queries, k, np.flatnonzero(kept), ef_search, usual_k)


def _search_rows(
    index: faiss.Index,
    lookup: _RowLookup,
    queries: np.ndarray,
    k: int,
    rows: np.ndarray,
    ef_search: int,
    usual_k: int,
) -> tuple[np.ndarray, np.ndarray]:
    if scored_exactly(len(rows), lookup.total, ef_search):
        return _exact(index, lookup, queries, k, rows)
    ef = max(
        widened_ef_search(ef_search, len(rows), lookup.total),
        deep_ef_search(ef_search, k, usual_k),
    )
    return _widened(index, lookup, queries, k, rows, ef)


class _RowLookup:
    """An index's stored ids by internal row (IndexIDMap's id_map, read in place) and how to find
    the rows of given ids: by binary search where the ids are sorted (every version writes them
    so), else through a sorted copy."""

    def __init__(self, index: faiss.Index):
        self.total = int(index.ntotal)
        id_map = faiss.downcast_index(index).id_map
        self.ids = (
            faiss.rev_swig_ptr(id_map.data(), self.total)
            if self.total
            else np.empty(0, dtype=np.int64)
        )
        self.order = None if _is_sorted(self.ids) else np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids if self.order is None else self.ids[self.order]

    def rows_of(self, wanted: np.ndarray) -> np.ndarray:
        """The sorted internal rows of the `wanted` ids this index holds."""
        wanted = np.asarray(wanted, dtype=np.int64)
        if len(self.sorted_ids) == 0 or len(wanted) == 0:
            return np.empty(0, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.sorted_ids, wanted), len(self.sorted_ids) - 1)
        at = at[self.sorted_ids[at] == wanted]
        rows = at if self.order is None else self.order[at]
        return rows if _is_sorted(rows) else np.unique(rows)


def _lookup(index: faiss.Index) -> _RowLookup:
    found = _ROW_LOOKUPS.get(index)
    if found is None or found.total != index.ntotal:
        found = _ROW_LOOKUPS[index] = _RowLookup(index)
    return found


def _exact(
    index: faiss.Index, lookup: _RowLookup, queries: np.ndarray, k: int, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    storage = faiss.downcast_index(inner(index).storage)
    dim = int(storage.d)
    vectors = faiss.rev_swig_ptr(storage.get_xb(), lookup.total * dim)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    ids = lookup.ids[rows]
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.empty(len(rows), dtype=np.float32)
    for number, query in enumerate(queries):
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores),
            faiss.swig_ptr(query),
            faiss.swig_ptr(vectors),
            faiss.swig_ptr(rows),
            dim,
            1,
            len(rows),
        )
        best = _best(scores, ids, k)
        best_scores[number, : len(best)], best_ids[number, : len(best)] = scores[best], ids[best]
    return best_scores, best_ids


def _best(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, best first, ties by id."""
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero(scores >= kth)
    else:
        candidates = np.arange(len(scores))
    order = np.lexsort((ids[candidates], -scores[candidates]))[:k]
    return candidates[order]


def _widened(
    index: faiss.Index,
    lookup: _RowLookup,
    queries: np.ndarray,
    k: int,
    rows: np.ndarray,
    ef_search: int,
) -> tuple[np.ndarray, np.ndarray]:
    member = np.zeros(lookup.total, dtype=bool)
    member[rows] = True
    bitmap = np.packbits(member, bitorder="little")
    selector = faiss.IDSelectorBitmap(lookup.total, faiss.swig_ptr(bitmap))
    params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search)
    scores, found = inner(index).search(np.ascontiguousarray(queries), k, params=params)
    del params, selector  # the bitmap outlives both
    ids = np.where(found >= 0, lookup.ids[np.maximum(found, 0)], -1)
    return scores, ids


def _is_sorted(values: np.ndarray) -> bool:
    return bool(len(values) < 2 or np.all(values[1:] > values[:-1]))


def inner(index: faiss.Index) -> faiss.Index:
    """The structure under an IndexIDMap (the index itself where there is none), downcast."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
