"""Compressed in memory, exact from disk: the `compressed` index type.

A hospital archive of tens of millions of images cannot keep every float32 vector in RAM (7.2 KB
an image for both spaces). This structure keeps only product-quantised codes in RAM, an inverted
file (IVF) over them, and re-ranks the best candidates exactly from the full vectors, stored as
float16 on disk and memory-mapped:

    {space}.faiss     IVF + PQ codes (after a PCA for wide spaces): in RAM
    {space}.f16.npy   the vectors as float16, row i = ids[i]: read only for the candidates

A query reads the RERANK_DEPTH (or RERANK_PER_K * k) nearest candidates by their codes, scores
them exactly from the float16 rows and returns the best k, ties broken by id. A filter runs as a
FAISS selector on the IVF search, then the survivors are re-ranked the same way; a filter that
passes at most EXACT_SCAN_MAX images is scored exactly over all of them (as flat would). Where the
probed lists hold fewer than k allowed images, more lists are probed, up to all of them, so a
search returns min(k, allowed) hits as flat does.

Why these settings (measured on the demo index's real 5,456 vectors, docs/benchmarks.md):
joint (512-d): IVF,PQ32 + re-rank 200 from float16: recall@10 0.994 (IVF64, nprobe 16). An OPQ
rotation raises that to 0.998 only (it pays at a shallow re-rank: 0.949 -> 0.978 at 50) for about
1.5x the training time, so it is not the default ("compressed:OPQ32,IVF64,PQ32" asks for it).
Encoder (1,280-d): a PCA to 256 dimensions, then the same. The float32 joint.npy/encoder.npy stay beside the float16
copy as the source of truth that add/remove/merge/reindex copy; they are not read by a search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

PREFIX = "compressed:"  # a factory string: "compressed:" + the FAISS factory of the codes
CODE_BYTES = 32  # PQ bytes per vector (per space)
WIDE_DIM = 512  # a space wider than this (the encoder's 1,280) is projected before PQ
REDUCED_DIM = 256  # ... by a PCA to this many dimensions
RERANK_DEPTH = 200  # candidates re-ranked exactly for k <= RERANK_DEPTH / RERANK_PER_K
RERANK_PER_K = 20  # ... and RERANK_PER_K * k for larger k
EXACT_SCAN_MAX = 10_000  # a filter passing at most this many images is scored exactly
NPROBE = 16  # inverted lists probed first (more where they hold too few allowed images)
PQ_TRAIN_MIN = 256  # an 8-bit product quantiser trains 256 centroids per sub-vector
MIN_PER_LIST = 39  # FAISS's floor for k-means training points per centroid
FLOAT16_SUFFIX = ".f16.npy"


def factory(count: int, dim: int) -> str:
    """The compressed factory string for `count` vectors of `dim` dimensions."""
    nlist = max(1, min(int(4 * math.sqrt(max(count, 1))), count // MIN_PER_LIST))
    if dim > WIDE_DIM:
        return f"{PREFIX}PCA{REDUCED_DIM},IVF{nlist},PQ{CODE_BYTES}"
    return f"{PREFIX}IVF{nlist},PQ{CODE_BYTES}"


def is_compressed(factory_string: str) -> bool:
    return factory_string.startswith(PREFIX)


def codes_factory(factory_string: str) -> str:
    """The FAISS factory of the in-memory part ("compressed:OPQ32,IVF64,PQ32" -> "OPQ32,...")."""
    return factory_string[len(PREFIX) :]


def training_points(factory_string: str) -> int:
    """The fewest vectors the codes train on: one per inverted list, 256 per sub-quantiser."""
    lists = [part for part in codes_factory(factory_string).split(",") if part.startswith("IVF")]
    nlist = int(lists[0][3:]) if lists and lists[0][3:].isdigit() else 1
    return max(PQ_TRAIN_MIN, nlist)


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
        allowed = None if params is None else params.allowed
        for row, query in enumerate(queries):
            if allowed is not None and len(allowed) <= EXACT_SCAN_MAX:
                candidates = allowed
            else:
                candidates = self._candidates(query, k, allowed)
            best_scores, best_ids = self._rerank(query, candidates, k)
            scores[row, : len(best_ids)], found[row, : len(best_ids)] = best_scores, best_ids
        return scores, found

    def _candidates(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
        """The ids nearest by their codes: rerank_depth(k) of them, from NPROBE lists or more,
        until min(k, allowed) are found or every list was probed."""
        wanted = min(k, self.ntotal if allowed is None else len(allowed))
        depth = min(rerank_depth(k), self.ntotal)
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed)
        nprobe = min(NPROBE, self.ivf.nlist)
        while True:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            _, ids = self.codes.search(query[None], depth, params=params)
            ids = ids[0][ids[0] >= 0]
            if len(ids) >= wanted or nprobe >= self.ivf.nlist:
                return ids
            nprobe = min(nprobe * 4, self.ivf.nlist)

    def _rerank(self, query: np.ndarray, candidates: np.ndarray, k: int):
        """Exact scores of the candidates from the float16 rows; the best k, ties by id."""
        rows = np.sort(np.searchsorted(self.ids, candidates))  # in file order: fewer seeks
        ids = self.ids[rows]
        scores = np.asarray(self.full[rows], dtype=np.float32) @ query
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


def build(factory_string: str, vectors: np.ndarray, ids: np.ndarray) -> CompressedIndex:
    """Train the codes on `vectors` (float32, rows sorted by id) and fill them with `ids`."""
    codes = faiss.index_factory(
        vectors.shape[1], codes_factory(factory_string), faiss.METRIC_INNER_PRODUCT
    )
    quieted = quiet_training(codes)  # held until trained: FAISS keeps a plain pointer to them
    codes.train(vectors)
    del quieted
    drop_training_state(codes)
    codes.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return CompressedIndex(codes, vectors.astype(np.float16), np.asarray(ids, dtype=np.int64))


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


def quiet_training(codes: faiss.Index) -> list[faiss.ProductQuantizer]:
    """No "please provide at least N training points" line per k-means: 256 centroids per
    sub-quantiser train well enough from fewer than FAISS's 39 points each (recall is measured,
    `convirt index info`). Returns the OPQ rotations' quantisers, to be kept alive while training."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(codes))
    ivf.cp.min_points_per_centroid = 1
    if hasattr(ivf, "pq"):
        ivf.pq.cp.min_points_per_centroid = 1
    if hasattr(ivf, "do_polysemous_training"):
        # the factory turns it on; it serves Hamming pre-filtering, which this search does not
        # use, and its simulated annealing took most of the training time
        ivf.do_polysemous_training = False
    held = []
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
