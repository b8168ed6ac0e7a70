"""Search speed and quality of each index type at archive scale (100k and 1M vectors).

The vectors are real embeddings repeated with noise: the joint-space vectors of an index built from
the shared archive (2,447 images) are the centres; each base vector is a centre plus Gaussian noise,
L2-normalised again. Queries are fresh noisy copies (not in the base). Ground truth is exact inner
product search. For each index type: build time, bytes per vector (serialised index), ms per query
one at a time (p50/p99) and batched, and recall@10 against exact search.

    python bench/search.py --index-root runs/index-cpu --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import faiss
import numpy as np

from index import faiss_index
from index.layout import current_version_dir
from index.version import read_version

K = 10


def real_centres(index_root: str) -> np.ndarray:
    files = read_version(current_version_dir(index_root))
    return np.asarray(files.vectors("joint"), dtype=np.float32)


def noisy_copies(centres: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, centres.shape[1]), np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        picks = centres[rng.integers(0, len(centres), n)]
        block = picks + rng.standard_normal(picks.shape, dtype=np.float32) * (
            noise / np.sqrt(centres.shape[1])
        )
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def measure(kind: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    factory = faiss_index.resolve_factory(kind, len(base), base.shape[1])
    started = time.perf_counter()
    index = faiss_index.build_index(factory, base, np.arange(len(base), dtype=np.int64))
    build_s = time.perf_counter() - started
    size = len(faiss.serialize_index(index))
    single = []
    for query in queries:
        t = time.perf_counter()
        index.search(query[None], K)
        single.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    _, found = index.search(queries, K)
    batched_ms = (time.perf_counter() - t) * 1000 / len(queries)
    return {
        "type": kind,
        "factory": factory,
        "build_s": round(build_s, 1),
        "bytes_per_vector": round(size / len(base), 1),
        "single_query_ms_p50": round(float(np.percentile(single, 50)), 3),
        "single_query_ms_p99": round(float(np.percentile(single, 99)), 3),
        "batched_ms_per_query": round(batched_ms, 3),
        "recall_at_10": round(recall(found, truth), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-root", required=True, help="an index built from real images")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--types", default="flat,hnsw,ivfpq")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm relative to 1")
    args = parser.parse_args()
    centres = real_centres(args.index_root)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        base = noisy_copies(centres, size, args.noise, seed=size)
        queries = noisy_copies(centres, args.queries, args.noise, seed=size + 1)
        _, truth = faiss.knn(queries, base, K, faiss.METRIC_INNER_PRODUCT)
        for kind in args.types.split(","):
            row = {"vectors": size, **measure(kind, base, queries, truth)}
            print(json.dumps(row), flush=True)
            results.append(row)
        del base
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} FAISS threads",
                "dim": int(centres.shape[1]),
                "centres": len(centres),
                "noise": args.noise,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
