"""The compressed index type (index/compressed.py) against flat on a real index's vectors: RAM and
disk bytes per image, recall@10 against exact search, single-query latency p50/p99, per space, in
one process (ratios to flat). Also what the choices rest on: OPQ or not (joint), and whether the
encoder space needs every dimension (exact search after a PCA to 256 vs on all 1,280).

    python bench/compressed_index.py --root runs/demo-index-cpu   # the 5,456 demo vectors

One FAISS thread (a served query's share of a two-core box). Results: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from index import compressed, faiss_index, layout
from index.version import read_version

QUERIES = 200
K = 10
PCA_DIM = 256  # the encoder's former projection: what exact search keeps of the neighbours


def recall(index, vectors: np.ndarray, ids: np.ndarray, sample: np.ndarray) -> float:
    """recall@K of `index` against exact search, each query's own id left out."""
    _, exact = faiss.knn(vectors[sample], vectors, K + 1, faiss.METRIC_INNER_PRODUCT)
    hits = 0
    for row, truth in zip(sample, exact, strict=True):
        wanted = [ids[i] for i in truth if i != row][:K]
        found = [i for i in index.search(vectors[row][None], K + 1)[1][0] if i != ids[row]][:K]
        hits += len(set(wanted) & set(found))
    return hits / (K * len(sample))


def latency(index, vectors: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    times = []
    for row in sample:
        start = time.perf_counter()
        index.search(vectors[row][None], K)
        times.append(time.perf_counter() - start)
    p50, p99 = np.percentile(times, [50, 99]) * 1000
    return float(p50), float(p99)


def reduced_recall(vectors: np.ndarray, sample: np.ndarray, dim: int) -> float:
    """recall@K of exact search after a PCA to `dim` dimensions, against all of them."""
    pca = faiss.PCAMatrix(vectors.shape[1], dim)
    pca.train(vectors)
    low = pca.apply(vectors)
    _, exact = faiss.knn(vectors[sample], vectors, K + 1, faiss.METRIC_INNER_PRODUCT)
    _, near = faiss.knn(low[sample], low, K + 1, faiss.METRIC_INNER_PRODUCT)
    hits = sum(
        len(set(e[e != r][:K]) & set(n[n != r][:K]))
        for r, e, n in zip(sample, exact, near, strict=True)
    )
    return hits / (K * len(sample))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo-index-cpu"))
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    files = read_version(layout.current_version_dir(args.root))
    ids = files.ids()
    rng = np.random.default_rng(0)
    sample = rng.choice(len(ids), size=min(QUERIES, len(ids)), replace=False)
    print(f"{len(ids)} images, {files.directory}")
    for space in ("joint", "encoder"):
        vectors = np.ascontiguousarray(files.vectors(space), dtype=np.float32)
        flat = faiss_index.build_index("Flat", vectors, ids)
        factory = faiss_index.resolve_factory("compressed", len(ids), vectors.shape[1])
        start = time.perf_counter()
        small = faiss_index.build_index(factory, vectors, ids)
        built = time.perf_counter() - start
        flat_ram = faiss_index.ram_bytes(flat) / len(ids)
        ram = small.ram_bytes() / len(ids)
        marginal = small.ivf.code_size + 8  # bytes each further image adds: codes and id
        disk = ram + small.full.dtype.itemsize * vectors.shape[1]
        found = recall(small, vectors, ids, sample)
        flat_p = latency(flat, vectors, sample)
        small_p = latency(small, vectors, sample)
        print(
            f"{space:8s} {factory}: built in {built:.1f}s; RAM/image {ram:.0f} B "
            f"({marginal} B marginal; flat {flat_ram:.0f} B, x{ram / flat_ram:.2f}); "
            f"disk/image {disk:.0f} B (codes + float16); recall@{K} {found:.3f}; "
            f"p50 {small_p[0]:.2f} ms (flat {flat_p[0]:.2f}, x{small_p[0] / flat_p[0]:.2f}), "
            f"p99 {small_p[1]:.2f} ms (flat {flat_p[1]:.2f}, x{small_p[1] / flat_p[1]:.2f})"
        )
        if space == "encoder":
            kept = reduced_recall(vectors, sample, PCA_DIM)
            print(f"{space:8s} exact search after PCA{PCA_DIM}: recall@{K} {kept:.3f}")
            lists = factory.split(",")[0].removeprefix(compressed.PREFIX)
            for other in (f"PCA{PCA_DIM},{lists},PQ32", f"PCA512,{lists},PQ64"):
                start = time.perf_counter()
                alternative = faiss_index.build_index(compressed.PREFIX + other, vectors, ids)
                built = time.perf_counter() - start
                ram = alternative.ram_bytes() / len(ids)
                value = recall(alternative, vectors, ids, sample)
                print(
                    f"{space:8s} {other}: built in {built:.1f}s; RAM/image {ram:.0f} B; "
                    f"recall@{K} {value:.3f}"
                )
        else:
            opq = factory.replace(
                compressed.PREFIX, f"{compressed.PREFIX}OPQ{compressed.code_bytes(512)},"
            )
            rotated = faiss_index.build_index(opq, vectors, ids)
            settings = compressed.RERANK_DEPTH, compressed.RERANK_PER_K
            for depth in (compressed.RERANK_DEPTH, 50):
                compressed.RERANK_DEPTH, compressed.RERANK_PER_K = depth, depth // K
                with_opq = recall(rotated, vectors, ids, sample)
                without = recall(small, vectors, ids, sample)
                print(
                    f"{space:8s} re-rank {depth}: recall@{K} with OPQ {with_opq:.3f}, without {without:.3f}"
                )
            # the next space is measured at the product's depth, not the last one tried here
            compressed.RERANK_DEPTH, compressed.RERANK_PER_K = settings


if __name__ == "__main__":
    main()
