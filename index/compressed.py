"""Compressed in memory, exact from disk: the `compressed` index type.

A hospital archive of tens of millions of images cannot keep every float32 vector in RAM (7.2 KB
an image for both spaces). This structure keeps only product-quantised codes in RAM, an inverted
file (IVF) over them, and re-ranks the best candidates exactly from the full vectors, stored as
float16 on disk and memory-mapped:

    {space}.faiss     IVF + PQ codes of every dimension: in RAM
    {space}.f16.npy   the vectors as float16, row i = ids[i]: read only for the candidates

A query reads the RERANK_DEPTH (or RERANK_PER_K * k) nearest candidates by their codes from
probes(nlist) lists, scores them exactly from the float16 rows and returns the best k, ties broken
by id. A filter passing at most EXACT_SCAN_MAX images is scored exactly over all of them (as flat
would); a broader one runs as a FAISS selector on the IVF search, probing lists nearest first until
they hold (estimated from ALLOWED_SAMPLE of its ids) as many allowed images as an unfiltered search
scans; where fewer than k allowed images are found, more lists, up to all of them, so a search
returns min(k, allowed) hits as flat does.

Why these settings (bench/archive_scale.py --sizes 100k --kinds compressed: 100k synthetic images,
100 queries a kind, one FAISS thread, a loaded 2-core box; and the demo's 5,456 real vectors,
bench/compressed_index.py; docs/benchmarks.md). Before: PCA256 (encoder), IVF{4 sqrt N},PQ32,
nprobe 16, recall@10 0.921 joint / 0.718 encoder unfiltered, 0.745 / 0.614 under a 10% filter.
- Codes: IVF,PQ64 over every dimension in both spaces (code_bytes). Joint PQ32 stops at 0.952
  however many lists are probed (the codes' error, at re-rank 200), PQ64 0.988. The encoder's
  PCA was its loss: FAISS's PCA centres the vectors, which reorders inner products (PQ32 0.61 ->
  0.77 without the centring), and 256 axes keep 97.6% of the energy (0.93 with PQ64); PQ64 on
  all 1,280: 0.988 (0.997 at 5.4k real, 2.3x PCA256,PQ32's training time, which sampling repaid).
  RAM: 64 B of code + 8 B of id a space, ids.npy's 8 B, and 2 B a space for the row-to-list map
  a broad filter builds: 156 B an image for both spaces at scale (target 200).
- Lists: sqrt(N). The probes needed grow as sqrt(nlist): at 100k the true top 10 lie in the
  probed lists 98% of the time at nprobe 8 of 79, 16 of 316, 32 of 1,264 (about 0.9 sqrt(nlist)),
  so probes() = max(NPROBE_MIN, 1.5 sqrt(nlist)): 27 at 100k (0.988), 85 of 3,162 at 10M (270k
  codes scanned, about 11 ms at the 40 ns a code measured). Fewer lists than 4 sqrt(N) cost
  fewer k-means and assignment operations per image at the price of longer lists.
- Broad filters: probing until the lists hold as many allowed images as an unfiltered search
  scans raised recall under the 10% filter to 1.000 (joint) and 0.999 (encoder), p50 3-5 ms.
- Build: k-means trains on at most TRAIN_PER_CENTROID = 64 points a list and each PQ on 64 a
  centroid (16,384), a seeded random sample; from HNSW_QUANTISER_MIN lists (1M images) an HNSW
  graph over the centroids assigns vectors to lists, in k-means and in add (at 3,162 lists 5x
  faster than a flat scan, the same list for 99-100% of vectors; recall at 100k with it: joint
  0.987, broad 0.985). 100k: joint 114 -> 17 s, encoder 72 -> 52 s. At 10M (CPU seconds, one
  thread, from measured per-operation costs): joint ~65 s training + 400 s adding (40 us a
  vector), encoder ~165 s + 2,060 s (206 us, half of it FAISS's PQ encoding of 20-dimension
  sub-vectors): about 45 min for both, before 5-6 h for the joint space alone.
- Exact scan: rows read in file order, SCAN_CHUNK at a time, scored by float16_scores (FAISS's
  fp16 scalar quantiser): 2,000 encoder rows of a float16 memmap 15.5 -> 3.4 ms, 10,000 112 -> 46
  ms (best of 15, 100k rows, page cache warm).
- OPQ is not the default ("compressed:OPQ64,IVF73,PQ64" asks for it): at 5.4k real, PQ32 with
  OPQ gained 0.004 at re-rank 200 for 1.5x the training time.
A compressed version keeps its vectors as float16 only: {space}.f16.npy is the source of truth
that add/remove/merge/reindex copy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

PREFIX = "compressed:"  # a factory string: "compressed:" + the FAISS factory of the codes
DIMS_PER_CODE_BYTE = 8  # PQ: one byte per 8 dimensions, at most MAX_CODE_BYTES
MAX_CODE_BYTES = 64  # joint 512-d -> PQ64, encoder 1,280-d -> PQ64 (20 dimensions a byte)
RERANK_DEPTH = 200  # candidates re-ranked exactly for k <= RERANK_DEPTH / RERANK_PER_K
RERANK_PER_K = 20  # ... and RERANK_PER_K * k for larger k
EXACT_SCAN_MAX = 10_000  # a filter passing at most this many images is scored exactly
SCAN_CHUNK = 4_096  # rows read from the float16 file and scored at a time (10 MB at 1,280-d)
NPROBE_MIN = 16  # inverted lists probed at the least ...
NPROBE_PER_ROOT = 1.5  # ... and NPROBE_PER_ROOT * sqrt(nlist) (see the module docstring)
ALLOWED_SAMPLE = 4_096  # allowed ids whose lists estimate where a broad filter's images lie
PQ_TRAIN_MIN = 256  # an 8-bit product quantiser trains 256 centroids per sub-vector
MIN_PER_LIST = 39  # FAISS's floor for k-means training points per centroid
HNSW_QUANTISER_MIN = 1_000  # lists (1M images) from which a vector's list is found by HNSW
TRAIN_PER_CENTROID = 64  # k-means (lists and PQ) trains on at most this many points a centroid
FLOAT16_SUFFIX = ".f16.npy"


def code_bytes(dim: int) -> int:
    """PQ bytes per vector: the largest divisor of `dim` up to dim / DIMS_PER_CODE_BYTE, at most
    MAX_CODE_BYTES."""
    target = max(1, min(MAX_CODE_BYTES, dim // DIMS_PER_CODE_BYTE))
    return max(m for m in range(1, target + 1) if dim % m == 0)


def list_count(count: int) -> int:
    """Inverted lists for `count` vectors: sqrt(count), at least MIN_PER_LIST vectors a list."""
    return max(1, min(int(math.sqrt(max(count, 1))), count // MIN_PER_LIST))


def factory(count: int, dim: int) -> str:
    """The compressed factory string for `count` vectors of `dim` dimensions: lists found by an
    HNSW graph over their centroids from HNSW_QUANTISER_MIN lists up (flat below)."""
    nlist = list_count(count)
    quantiser = "_HNSW32" if nlist >= HNSW_QUANTISER_MIN else ""
    return f"{PREFIX}IVF{nlist}{quantiser},PQ{code_bytes(dim)}"


def probes(nlist: int) -> int:
    """Lists an unfiltered search probes: max(NPROBE_MIN, NPROBE_PER_ROOT * sqrt(nlist))."""
    return min(nlist, max(NPROBE_MIN, math.ceil(NPROBE_PER_ROOT * math.sqrt(nlist))))


def training_size(factory_string: str) -> int:
    """How many vectors the codes train on at most (a random sample of them): TRAIN_PER_CENTROID
    a list's centroid, and as many for each of the PQ's 256 centroids a sub-quantiser."""
    return TRAIN_PER_CENTROID * max(PQ_TRAIN_MIN, _nlist(factory_string))


def is_compressed(factory_string: str) -> bool:
    return factory_string.startswith(PREFIX)


def codes_factory(factory_string: str) -> str:
    """The FAISS factory of the in-memory part ("compressed:OPQ32,IVF64,PQ32" -> "OPQ32,...")."""
    return factory_string[len(PREFIX) :]


def training_points(factory_string: str) -> int:
    """The fewest vectors the codes train on: one per inverted list, 256 per sub-quantiser."""
    return max(PQ_TRAIN_MIN, _nlist(factory_string))


def _nlist(factory_string: str) -> int:
    """The lists an "IVF{n}" or "IVF{n}_HNSW32" part names (1 without one)."""
    found = re.search(r"(?:^|,)IVF(\d+)", codes_factory(factory_string))
    return int(found.group(1)) if found else 1


def float16_path(directory: Path, space: str) -> Path:
    return Path(directory) / f"{space}{FLOAT16_SUFFIX}"


def rerank_depth(k: int) -> int:
    return max(RERANK_DEPTH, RERANK_PER_K * k)


@dataclass(frozen=True)
class Restriction:
    """What a filtered search may return: sorted allowed ids (search_params' answer for a
    compressed index, passed back to CompressedIndex.search as `params`)."""

    allowed: np.ndarray


class CompressedIndex:
    """IVF-PQ codes in RAM, float16 vectors on disk; answers `search` like a FAISS index (scores,
    ids; -1 where fewer than k are found) so index.read.search treats it as one."""

    def __init__(self, codes: faiss.Index, full: np.ndarray, ids: np.ndarray):
        self.codes = codes  # IndexIVFPQ, or IndexPreTransform (OPQ / PCA) over one
        self.ivf = faiss.extract_index_ivf(codes)
        self.full = full  # N x d float16, row i = ids[i] (memory-mapped when opened)
        self.ids = ids  # sorted int64
        self.d = int(codes.d)
        self.nprobe = probes(self.ivf.nlist)
        self._row_lists: np.ndarray | None = None  # each row's list, built by a broad filter
        self._centroids: np.ndarray | None = None  # the lists' centroids, likewise

    @property
    def ntotal(self) -> int:
        return int(self.codes.ntotal)

    def search(
        self, queries: np.ndarray, k: int, params: Restriction | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest (inner product) per query row, exactly scored; `params` a Restriction."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        allowed = None if params is None else self._held(params.allowed)
        exact = allowed is not None and len(allowed) <= EXACT_SCAN_MAX
        selector = per_list = None
        if allowed is not None and not exact:
            selector = faiss.IDSelectorBatch(allowed)
            per_list = self._allowed_per_list(allowed)
        for row, query in enumerate(queries):
            if exact:
                candidates = allowed
            else:
                candidates = self._candidates(query, k, allowed, selector, per_list)
            best_scores, best_ids = self._rerank(query, candidates, k)
            scores[row, : len(best_ids)], found[row, : len(best_ids)] = best_scores, best_ids
        return scores, found

    def _candidates(self, query, k, allowed, selector, per_list) -> np.ndarray:
        """The ids nearest by their codes: rerank_depth(k) of them from self.nprobe lists (under
        a filter: lists until they hold as many allowed images), more where fewer than min(k,
        allowed) are found, up to every list."""
        wanted = min(k, self.ntotal if allowed is None else len(allowed))
        depth = min(rerank_depth(k), self.ntotal)
        nlist = self.ivf.nlist
        nprobe = self.nprobe if per_list is None else self._filtered_probes(query, per_list)
        while True:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            _, ids = self.codes.search(query[None], depth, params=params)
            ids = ids[0][ids[0] >= 0]
            if len(ids) >= wanted or nprobe >= nlist:
                return ids
            nprobe = min(nprobe * 4, nlist)

    def _filtered_probes(self, query: np.ndarray, per_list: np.ndarray) -> int:
        """Lists to probe, nearest first, until they hold (by estimate) as many allowed images as
        an unfiltered search scans: a 10% filter probes about 10x the lists where its images
        are spread evenly, fewer where they gather near the query."""
        nlist = self.ivf.nlist
        wanted = self.nprobe * self.ntotal / nlist
        coarse = query[None]
        if isinstance(self.codes, faiss.IndexPreTransform):
            coarse = self.codes.apply_chain(1, coarse)
        if self._centroids is None:  # flat or HNSW quantiser alike: every list's score
            self._centroids = self.ivf.quantizer.reconstruct_n(0, nlist)
        order = np.argsort(-(self._centroids @ coarse[0]), kind="stable")
        held = np.cumsum(per_list[order])
        return int(min(nlist, max(self.nprobe, np.searchsorted(held, wanted) + 1)))

    def _held(self, allowed: np.ndarray) -> np.ndarray:
        """The allowed ids this index holds: ids are mapped to rows by binary search, so an id
        it lacks (another segment's) must never reach that mapping."""
        if len(allowed) == 0 or len(self.ids) == 0:
            return allowed[:0]
        rows = np.minimum(np.searchsorted(self.ids, allowed), len(self.ids) - 1)
        return allowed[self.ids[rows] == allowed]

    def _allowed_per_list(self, allowed: np.ndarray) -> np.ndarray:
        """Estimated allowed images per inverted list, from ALLOWED_SAMPLE of them evenly spaced
        (looking up every one of a 10% filter's 1M ids at 10M would cost ~100 ms)."""
        if self._row_lists is None:
            self._row_lists = self._lists_of_rows()
        picks = np.linspace(0, len(allowed) - 1, min(len(allowed), ALLOWED_SAMPLE)).astype(int)
        rows = np.searchsorted(self.ids, allowed[picks])
        counts = np.bincount(self._row_lists[rows], minlength=self.ivf.nlist)
        return counts * (len(allowed) / len(picks))

    def _lists_of_rows(self) -> np.ndarray:
        """Each row's inverted list (2 bytes an image below 65,536 lists; built once)."""
        lists = self.ivf.invlists
        found = np.zeros(len(self.ids), dtype=np.uint16 if self.ivf.nlist < 2**16 else np.uint32)
        for number in range(self.ivf.nlist):
            size = lists.list_size(number)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
                found[np.searchsorted(self.ids, ids)] = number
        return found

    def _rerank(self, query: np.ndarray, candidates: np.ndarray, k: int):
        """Exact scores of the candidates from the float16 rows; the best k, ties by id. Rows are
        read in file order, SCAN_CHUNK at a time (a dense run of rows as one slice)."""
        rows = np.sort(np.searchsorted(self.ids, candidates))
        scores = np.empty(len(rows), dtype=np.float32)
        for start in range(0, len(rows), SCAN_CHUNK):
            part = rows[start : start + SCAN_CHUNK]
            first, last = int(part[0]), int(part[-1]) + 1
            if last - first <= 2 * len(part):  # dense: one sequential read, then a selection
                block = self.full[first:last][part - first]
            else:
                block = self.full[part]
            scores[start : start + len(part)] = float16_scores(block, query)
        ids = self.ids[rows]
        best = np.lexsort((ids, -scores))[:k]
        return scores[best], ids[best]

    def write(self, directory: Path, space: str) -> None:
        faiss.write_index(self.codes, str(Path(directory) / f"{space}.faiss"))
        np.save(float16_path(directory, space), np.asarray(self.full, dtype=np.float16))

    def stored_ids(self) -> np.ndarray:
        """The ids the inverted lists hold (for `verify`), unsorted."""
        lists = self.ivf.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(self.ivf.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def ram_bytes(self) -> int:
        """What the in-memory part takes: codes and ids in the lists, the coarse centroids and
        the rotation or projection (the float16 file is on disk)."""
        return len(faiss.serialize_index(self.codes))


def float16_scores(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Inner products of float16 rows with a float32 query, as float32 sums of the float16
    values widened: FAISS's fp16 scalar quantiser widens them in SIMD registers (F16C), 6-8x
    faster than numpy's astype(float32) then a product (2.5 ms vs 17 for 10,000 x 1,280)."""
    scorer = faiss.IndexScalarQuantizer(
        rows.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    faiss.copy_array_to_vector(
        np.ascontiguousarray(rows, dtype=np.float16).view(np.uint8).ravel(), scorer.codes
    )
    scorer.ntotal = len(rows)
    found, order = scorer.search(query[None], len(rows))
    scores = np.empty(len(rows), dtype=np.float32)
    scores[order[0]] = found[0]
    return scores


def build(factory_string: str, vectors: np.ndarray, ids: np.ndarray) -> CompressedIndex:
    """Train the codes on a sample of `vectors` (float32, rows sorted by id; training_size of
    them) and fill them with every one."""
    codes = faiss.index_factory(
        vectors.shape[1], codes_factory(factory_string), faiss.METRIC_INNER_PRODUCT
    )
    held = prepare_training(codes)  # held until trained: FAISS keeps a plain pointer to them
    codes.train(training_sample(vectors, training_size(factory_string)))
    del held
    drop_training_state(codes)
    codes.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return CompressedIndex(codes, vectors.astype(np.float16), np.asarray(ids, dtype=np.int64))


def training_sample(vectors: np.ndarray, size: int) -> np.ndarray:
    """`size` rows drawn at random (seeded: a rebuild trains the same codes), in row order."""
    if len(vectors) <= size:
        return vectors
    picks = np.sort(np.random.default_rng(0).choice(len(vectors), size, replace=False))
    return np.ascontiguousarray(vectors[picks])


def drop_training_state(codes: faiss.Index) -> None:
    """Free what only training needs: a PCA keeps its full covariance eigenvectors (1,280 x
    1,280 floats, 6.5 MB) beside the 256 x 1,280 projection a search applies; held in RAM by
    every server, they would cost 1.1 KB an image at 5k images."""
    if not isinstance(codes, faiss.IndexPreTransform):
        return
    for step in range(codes.chain.size()):
        transform = faiss.downcast_VectorTransform(codes.chain.at(step))
        if isinstance(transform, faiss.PCAMatrix):
            transform.PCAMat.resize(0)
            transform.eigenvalues.resize(0)


def prepare_training(codes: faiss.Index) -> list[faiss.ProductQuantizer]:
    """k-means (the lists' and each sub-quantiser's) on at most TRAIN_PER_CENTROID points a
    centroid, and no "please provide at least N training points" line per k-means: 256 centroids
    per sub-quantiser train well enough from fewer than FAISS's 39 points each (recall is
    measured, `convirt index info`). Returns the OPQ rotations' quantisers, and the HNSW
    assigner, to be kept alive while training."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(codes))
    ivf.cp.max_points_per_centroid = TRAIN_PER_CENTROID
    held: list = []
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat):
        # k-means assigns its points by an HNSW graph too, rebuilt each iteration (~5x faster
        # than a flat scan of 3,162 centroids, the same list for 99-100% of the points)
        assigner = faiss.IndexHNSWFlat(ivf.d, 32)
        ivf.clustering_index = assigner
        held.append(assigner)
    ivf.cp.min_points_per_centroid = 1
    if hasattr(ivf, "pq"):
        ivf.pq.cp.min_points_per_centroid = 1
        ivf.pq.cp.max_points_per_centroid = TRAIN_PER_CENTROID
    if hasattr(ivf, "do_polysemous_training"):
        # the factory turns it on; it serves Hamming pre-filtering, which this search does not
        # use, and its simulated annealing took most of the training time
        ivf.do_polysemous_training = False
    codes = faiss.downcast_index(codes)
    if isinstance(codes, faiss.IndexPreTransform):
        for i in range(codes.chain.size()):
            transform = faiss.downcast_VectorTransform(codes.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                quantiser = faiss.ProductQuantizer(transform.d_out, transform.M, 8)
                quantiser.cp.min_points_per_centroid = 1
                transform.pq = quantiser
                held.append(quantiser)
    return held


def open_index(directory: Path, space: str, codes: faiss.Index) -> CompressedIndex:
    """A published compressed index: the codes read, the float16 vectors and ids memory-mapped."""
    full = np.load(float16_path(directory, space), mmap_mode="r")
    ids = np.load(Path(directory) / "ids.npy", mmap_mode="r")
    return CompressedIndex(codes, full, ids)
