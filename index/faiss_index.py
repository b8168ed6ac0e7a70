"""FAISS indexes over L2-normalised vectors: inner product, stable 64-bit ids (IndexIDMap2).

--index-type picks the structure:
    auto        flat, hnsw or compressed, from the vector count and the RAM budget (below)
    flat        exact inner product (IndexFlatIP)
    hnsw        HNSW graph, M = HNSW_M (efConstruction HNSW_EF_CONSTRUCTION, efSearch
                HNSW_EF_SEARCH; filters, exclusions and reads deeper than RECALL_K:
                index/hnsw_filter.py)
    ivfpq       inverted lists + product quantisation (needs IVFPQ_MIN_PER_LIST vectors per list)
    compressed  IVF + PQ codes in RAM, re-ranked exactly from float16 vectors on disk
                (index/compressed.py; "compressed:FACTORY" names the codes' FAISS factory)
    other       any FAISS index_factory string, e.g. "IVF256,Flat" or "HNSW64"

How `auto` chooses (choose_auto), for N vectors per space and a RAM budget B in bytes (--ram-budget,
recorded in version.json so add/remove keep it; none: no limit):
    flat        N < AUTO_EXACT_MAX and N * ram_per_image("flat") <= B   (the demo index: flat)
    hnsw        N * ram_per_image("hnsw") <= B
    compressed  otherwise (N * ram_per_image("compressed") is what it takes; the .f16.npy files are
                on disk, read for the re-ranked candidates only)
ram_per_image sums both spaces: flat 4 d + 16 (ids), hnsw 4 d + 8 M + 16, compressed
code_bytes(d) (64 B for 512-d and 1,280-d) + 8 (ids in the lists) + 8 (ids.npy) per space.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from . import compressed, hnsw_filter
from .compressed import CompressedIndex
from .errors import IndexSpecError

AUTO_EXACT_MAX = 50_000  # below this many vectors `auto` is exact
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16
IVFPQ_MIN_PER_LIST = 39  # FAISS's own floor for k-means training points per centroid
PQ_TRAIN_MIN = 256  # an 8-bit product quantiser needs 256 training points
PQ_DIMS_PER_CODE = 16  # ivfpq: one byte per 16 dimensions (512-d -> 32 bytes)
RECALL_SAMPLE = 200  # queries used to measure an approximate index against exact search
RECALL_K = 10
NAMED_TYPES = ("auto", "flat", "hnsw", "ivfpq", "compressed")
ID_BYTES = 8


def ram_per_image(kind: str, dims: list[int]) -> int:
    """About the RAM one image takes in a structure, every space together (see the rule above)."""
    if kind == "flat":
        return sum(4 * d + 2 * ID_BYTES for d in dims)
    if kind == "hnsw":
        return sum(4 * d + 8 * HNSW_M + 2 * ID_BYTES for d in dims)
    return sum(compressed.code_bytes(d) + 2 * ID_BYTES for d in dims)


def choose_auto(count: int, dims: list[int], ram_budget: int | None = None) -> str:
    """What `auto` builds for `count` vectors in spaces of `dims` within `ram_budget` bytes."""

    def fits(kind: str) -> bool:
        return ram_budget is None or count * ram_per_image(kind, dims) <= ram_budget

    if count < AUTO_EXACT_MAX and fits("flat"):
        return "flat"
    if count < compressed.PQ_TRAIN_MIN:
        return "flat"  # too few to train codes on: they would not fit much better anyway
    return "hnsw" if fits("hnsw") else "compressed"


def resolve_factory(index_type: str, count: int, dim: int, auto_as: str | None = None) -> str:
    """The FAISS factory string for an --index-type and a number of vectors; `auto_as`: what
    `auto` stands for (choose_auto over every space), else flat below AUTO_EXACT_MAX, hnsw above."""
    kind = index_type.strip()
    if kind == "auto":
        kind = auto_as or choose_auto(count, [dim])
    if kind == "compressed":
        return compressed.factory(count, dim)
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M}"
    if kind == "ivfpq":
        nlist = max(1, min(int(4 * math.sqrt(max(count, 1))), count // IVFPQ_MIN_PER_LIST))
        return f"IVF{nlist},PQ{pq_codes(dim)}"
    return kind


def pq_codes(dim: int) -> int:
    target = max(1, dim // PQ_DIMS_PER_CODE)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def check_index_type(factory: str, dim: int) -> None:
    """Fail early (before any embedding) on an --index-type that is neither a named type nor a
    factory string FAISS can parse."""
    if factory in NAMED_TYPES:
        return
    try:
        faiss.index_factory(
            dim,
            compressed.codes_factory(factory) if compressed.is_compressed(factory) else factory,
            faiss.METRIC_INNER_PRODUCT,
        )
    except RuntimeError as err:
        raise IndexSpecError(
            f"--index-type {factory!r} is not one of {', '.join(NAMED_TYPES)} and FAISS cannot "
            f"parse it as an index_factory string: {_faiss_reason(err)}"
        ) from err


def build_index(
    factory: str, vectors: np.ndarray, ids: np.ndarray
) -> faiss.Index | CompressedIndex:
    """Train (when the structure needs it) and fill an IndexIDMap2 over `vectors` with `ids` (a
    CompressedIndex for a "compressed:" factory)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if compressed.is_compressed(factory):
        needed = compressed.training_points(factory)
        if len(vectors) < needed:
            raise IndexSpecError(
                f"index type {factory!r} needs at least {needed} vectors to train, this index "
                f"has {len(vectors)}: use --index-type flat (exact) or auto for an archive this size"
            )
        return compressed.build(factory, vectors, ids)
    dim = vectors.shape[1]
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    hnsw = _hnsw(inner)
    if hnsw is not None:
        hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not inner.is_trained:
        _train(inner, factory, vectors)
    index = faiss.IndexIDMap2(inner)
    if len(ids):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    tune_for_search(index)
    return index


def _train(inner: faiss.Index, factory: str, vectors: np.ndarray) -> None:
    needed = minimum_training_points(inner)
    if len(vectors) < needed:
        raise IndexSpecError(
            f"index type {factory!r} needs at least {needed} vectors to train, this index has "
            f"{len(vectors)}: use --index-type flat (exact) or auto for an archive this size"
        )
    try:
        inner.train(vectors)
    except RuntimeError as err:
        raise IndexSpecError(
            f"FAISS could not train {factory!r} on {len(vectors)} vectors: {_faiss_reason(err)}; "
            "use --index-type flat or auto"
        ) from err


def minimum_training_points(inner: faiss.Index) -> int:
    ivf = _ivf(inner)
    needed = ivf.nlist * IVFPQ_MIN_PER_LIST if ivf is not None else 1
    if "PQ" in type(faiss.downcast_index(inner)).__name__:
        needed = max(needed, PQ_TRAIN_MIN)
    return needed


def write_index(index: faiss.Index | CompressedIndex, directory: Path, space: str) -> None:
    """{space}.faiss (and, for a compressed index, {space}.f16.npy) in a version directory."""
    if isinstance(index, CompressedIndex):
        index.write(directory, space)
    else:
        faiss.write_index(index, str(Path(directory) / f"{space}.faiss"))


def read_index(directory: Path, space: str) -> faiss.Index | CompressedIndex:
    """A published space's index, tuned for search: compressed where {space}.f16.npy is beside it."""
    index = faiss.read_index(str(Path(directory) / f"{space}.faiss"))
    if compressed.float16_path(directory, space).is_file():
        return compressed.open_index(directory, space, index)
    tune_for_search(index)
    return index


def tune_for_search(index: faiss.Index) -> None:
    """Search-time settings that index files do not store (efSearch, nprobe)."""
    inner = hnsw_filter.inner(index)
    hnsw = _hnsw(inner)
    if hnsw is not None:
        hnsw.efSearch = HNSW_EF_SEARCH
    ivf = _ivf(inner)
    if ivf is not None:
        ivf.nprobe = min(IVF_NPROBE, ivf.nlist)


def filtered_search(
    index: faiss.Index | CompressedIndex, queries: np.ndarray, k: int, allowed_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores, ids) of the k nearest among `allowed_ids` where the structure answers a filter
    its own way (HNSW over flat storage: exact or widened, index/hnsw_filter.py), else None."""
    if isinstance(index, CompressedIndex) or not hnsw_filter.is_hnsw_flat(index):
        return None
    return hnsw_filter.search(index, queries, k, allowed_ids, HNSW_EF_SEARCH, RECALL_K)


def excluding_search(
    index: faiss.Index | CompressedIndex, queries: np.ndarray, k: int, excluded_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores, ids) of the k nearest none of `excluded_ids` where the structure leaves many out
    its own way (HNSW over flat storage, index/hnsw_filter.py), else None (over-fetch)."""
    if isinstance(index, CompressedIndex) or not hnsw_filter.is_hnsw_flat(index):
        return None
    return hnsw_filter.search_excluding(index, queries, k, excluded_ids, HNSW_EF_SEARCH, RECALL_K)


def depth_params(index: faiss.Index | CompressedIndex, k: int) -> faiss.SearchParameters | None:
    """Parameters for reading the k nearest without a filter: an HNSW index searches wider for
    a k above RECALL_K (index/hnsw_filter.deep_ef_search), else None (the index's own)."""
    if (
        isinstance(index, CompressedIndex)
        or _hnsw(hnsw_filter.inner(index)) is None
        or k <= RECALL_K
    ):
        return None
    return faiss.SearchParametersHNSW(
        efSearch=hnsw_filter.deep_ef_search(HNSW_EF_SEARCH, k, RECALL_K)
    )


def search_params(index: faiss.Index, allowed_ids: np.ndarray) -> faiss.SearchParameters | None:
    """Parameters restricting a search to `allowed_ids`, or None where the structure can't."""
    if isinstance(index, CompressedIndex):
        return compressed.Restriction(np.ascontiguousarray(allowed_ids, dtype=np.int64))
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
    inner = hnsw_filter.inner(index)
    if isinstance(inner, faiss.IndexFlat):
        params = faiss.SearchParameters(sel=selector)
    elif isinstance(inner, faiss.IndexHNSW):
        ef = hnsw_filter.widened_ef_search(HNSW_EF_SEARCH, len(allowed_ids), int(index.ntotal))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
    elif isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=_ivf(inner).nprobe)
    else:
        return None
    params.referenced_selector = selector  # keep it alive as long as the parameters
    return params


def measure_recall(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> float | None:
    """recall@RECALL_K of `index` against exact search, on a fixed sample of stored vectors."""
    if len(ids) == 0 or (
        not isinstance(index, CompressedIndex)
        and isinstance(hnsw_filter.inner(index), faiss.IndexFlat)
    ):
        return None
    rng = np.random.default_rng(0)
    sample = rng.choice(len(ids), size=min(RECALL_SAMPLE, len(ids)), replace=False)
    k = min(RECALL_K, len(ids))
    queries = np.ascontiguousarray(vectors[sample], dtype=np.float32)
    _, exact_rows = faiss.knn(queries, np.ascontiguousarray(vectors), k, faiss.METRIC_INNER_PRODUCT)
    _, approx = index.search(queries, k)
    hits = sum(
        len(set(ids[row]) & set(found)) for row, found in zip(exact_rows, approx, strict=True)
    )
    return round(hits / (k * len(sample)), 4)


def ids_of(index: faiss.Index | CompressedIndex) -> np.ndarray:
    if isinstance(index, CompressedIndex):
        return index.stored_ids()
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def describe(index: faiss.Index | CompressedIndex) -> str:
    if isinstance(index, CompressedIndex):
        return f"compressed {type(faiss.downcast_index(index.codes)).__name__}"
    return type(hnsw_filter.inner(index)).__name__


def ram_bytes(index: faiss.Index | CompressedIndex) -> int:
    """What a loaded index holds in RAM (its serialised size; a compressed index's float16
    vectors are on disk, not counted)."""
    if isinstance(index, CompressedIndex):
        return index.ram_bytes()
    return len(faiss.serialize_index(index))


def _hnsw(inner: faiss.Index):
    inner = faiss.downcast_index(inner)
    return inner.hnsw if isinstance(inner, faiss.IndexHNSW) else None


def _ivf(inner: faiss.Index):
    try:
        return faiss.extract_index_ivf(inner)
    except RuntimeError:
        return None


def _faiss_reason(err: RuntimeError) -> str:
    text = str(err).strip()
    return text.rsplit(": ", 1)[-1] if ": " in text else text
