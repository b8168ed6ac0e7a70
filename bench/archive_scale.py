"""Search at a hospital archive's scale (issue 25, item 4): flat, HNSW and compressed indexes over
synthetic archives of 1M-10M images whose neighbourhoods match the real ones
(bench/archive_vectors.py), both spaces, with exact ground truth.

    python bench/archive_scale.py --check                  # generator vs the real 5,456 vectors
    python bench/archive_scale.py --sizes 100k             # a smoke run
    python bench/archive_scale.py --sizes 100k --kinds compressed --spaces encoder  # one of each
    python bench/archive_scale.py --sizes 1M,5M,10M --folder /big/disk

--check builds each index type exactly as `convirt index build` does (index.faiss_index.
build_index) on the real vectors and on as many generated ones, and prints recall@10 (200
queries, self excluded) and the nearest-neighbour cosines side by side. A size run prints, per
space and index type: build time, RAM and disk bytes per image, single-query p50/p99 through
index.read.search.search_within (unfiltered and under FILTERS: 0.43%, 1.7%, 10% and 36% of the
images; --kinds and --spaces pick what is built), recall@10 against
exact search (brute force streamed over the generated chunks) for held-out generated images
and, in the joint space, real report sentences as text queries. What is approximated:
  - the indexes are filled chunk by chunk (the product's build holds every vector in memory,
    which 10M x 1,280 floats does not fit), with the product's factory strings and settings
    (resolve_factory, HNSW efConstruction/efSearch, compressed.prepare_training and
    drop_training_state); compressed codes train on the first compressed.training_size images
    (the product draws as many at random);
  - a filter's ids come from meta.sqlite with the field tables of index/write/lookups.py,
    through index.read.filters.filtered_ids, timed apart ("ids ms": once per filter, median of
    3), then passed to search_within as the store does;
  - adding 1% and compacting are measured by bench/segment_writes.py (index/write's path).
Before a size starts its disk and RAM needs are printed (per image: from the smaller size just
measured, else index.faiss_index.ram_per_image); a type that will not fit is skipped, saying
so. One FAISS thread throughout (a served query's share of a two-core box), builds included.
Each size's files are deleted after it is measured unless --keep. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import archive_vectors as synthetic
import faiss
import numpy as np
from common import percentiles_ms
from compressed_index import recall as self_excluded_recall

from index import compressed, faiss_index, layout, metadata
from index.read import lookup
from index.read.filters import FieldTables, filtered_ids
from index.read.search import search_within
from index.version import read_version
from index.write import lookups, rows

K = 10
KINDS = ("flat", "hnsw", "compressed")
FILTERS = {
    "narrow": {"body_part": "head", "study_date": {"gte": "2021-01-01", "lte": "2021-03-31"}},
    "medium": {"body_part": "head", "study_date": {"gte": "2021-01-01", "lte": "2021-12-31"}},
    "broad": {"modality": "CT", "body_part": "abdomen"},
    "wide": {"modality": "CT"},
}
META_BYTES = 400  # meta.sqlite bytes per image before one is measured
EMPTY = np.empty(0, dtype=np.int64)


def parse_size(text: str) -> int:
    units = {"k": 1_000, "m": 1_000_000}
    text = text.strip().lower()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


# -- the generator check ---------------------------------------------------------------------


def neighbour_cosines(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Percentiles 10/50/90 of the 1st and 10th neighbour's cosine, and the TwoNN intrinsic
    dimension (Facco et al. 2017) of a set, self excluded."""
    sims, _ = faiss.knn(vectors, vectors, K + 1, faiss.METRIC_INNER_PRODUCT)
    first, tenth = (np.percentile(sims[:, j], [10, 50, 90]) for j in (1, K))
    distances = np.sqrt(np.maximum(2 - 2 * sims[:, 1:3], 1e-12))
    ratio = distances[:, 1] / np.maximum(distances[:, 0], 1e-9)
    ratio = ratio[ratio > 1]
    return first, tenth, float(len(ratio) / np.sum(np.log(ratio)))


def check(root: Path, seed: int) -> None:
    real = synthetic.fit(root)
    count = real.count
    sample = np.random.default_rng(0).choice(count, size=200, replace=False)
    ids = np.arange(1, count + 1, dtype=np.int64)
    print(f"generator check: {count} real images of {root} vs {count} generated (seed {seed})")
    print(f"{'space':8s} {'measure':42s} {'real':>18s} {'generated':>18s}")
    generator = synthetic.Generator(real, seed)
    for space in synthetic.SPACES:
        sets = {"real": real.vectors[space], "generated": generator.vectors(count, space)}
        found: dict[str, dict[str, str]] = {}
        for name, vectors in sets.items():
            first, tenth, dimension = neighbour_cosines(vectors)
            found.setdefault("1st-neighbour cosine p10/p50/p90", {})[name] = fmt(first)
            found.setdefault("10th-neighbour cosine p10/p50/p90", {})[name] = fmt(tenth)
            found.setdefault("intrinsic dimension (TwoNN)", {})[name] = f"{dimension:.1f}"
            for kind in KINDS:
                factory = faiss_index.resolve_factory(kind, count, vectors.shape[1])
                index = faiss_index.build_index(factory, vectors, ids)
                value = self_excluded_recall(index, vectors, ids, sample)
                found.setdefault(f"recall@10 {kind} ({factory})", {})[name] = f"{value:.3f}"
                if kind == "compressed":  # the codes alone, and a shallow re-rank
                    for depth in (K, 50):
                        saved = compressed.RERANK_DEPTH, compressed.RERANK_PER_K
                        compressed.RERANK_DEPTH, compressed.RERANK_PER_K = depth, depth // K
                        value = self_excluded_recall(index, vectors, ids, sample)
                        compressed.RERANK_DEPTH, compressed.RERANK_PER_K = saved
                        label = "codes only" if depth == K else f"re-rank {depth}"
                        found.setdefault(f"recall@10 compressed, {label}", {})[name] = (
                            f"{value:.3f}"
                        )
        for measure, values in found.items():
            print(f"{space:8s} {measure:42s} {values['real']:>18s} {values['generated']:>18s}")


def fmt(values: np.ndarray) -> str:
    return "/".join(f"{v:.3f}" for v in values)


# -- one archive size ----------------------------------------------------------------------


def write_metadata(real, generator, count: int, folder: Path) -> tuple[float, int]:
    """meta.sqlite (and an empty thumbs.sqlite) of `count` generated images, with the field
    tables and facets written at publish; (seconds, bytes)."""
    started = time.perf_counter()
    conn = rows.create(folder / "meta.sqlite")
    for chunk in generator.chunks(count, spaces=()):
        rows.insert_rows(conn, synthetic.metadata_rows(real, chunk))
    conn.commit()
    lookups.write(conn)
    conn.close()
    return time.perf_counter() - started, (folder / "meta.sqlite").stat().st_size


def filter_ids(folder: Path) -> dict[str, tuple[np.ndarray, float]]:
    """Each filter's sorted allowed ids, and the median ms of reading them (the product's path)."""
    conn = metadata.open_readonly(folder / "meta.sqlite")
    tables = FieldTables(conn, lookup.stored_tables(conn))
    fields = lookup.meta_fields(conn)
    found = {}
    for name, spec in FILTERS.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            allowed = filtered_ids(conn, spec, fields, tables)
            times.append(time.perf_counter() - started)
        found[name] = (np.array(sorted(allowed), dtype=np.int64), statistics.median(times) * 1000)
    conn.close()
    return found


def queries(real, seed: int, count: int, root: Path) -> dict[str, dict[str, np.ndarray]]:
    """space -> query kind -> vectors: held-out generated images; real report sentences (joint)."""
    held_out = synthetic.Generator(real, seed, stream=synthetic.QUERY_STREAM).chunk(0, count)
    found = {space: {"image": held_out.vectors[space]} for space in synthetic.SPACES}
    sentences = np.load(read_version(layout.current_version_dir(root)).directory / "sentences.npy")
    pick = np.random.default_rng(seed).choice(len(sentences), size=count, replace=False)
    text = np.ascontiguousarray(sentences[pick], dtype=np.float32)
    found["joint"]["text"] = text / np.linalg.norm(text, axis=1, keepdims=True)
    return found


def ground_truth(generator, count: int, asked: dict, allowed: dict) -> dict:
    """(space, query kind, filter or "all") -> the exact top-K ids, by brute force over every
    generated chunk."""
    best: dict = {}
    for chunk in generator.chunks(count):
        ids = chunk.ids
        masks = {"all": None} | {name: np.isin(ids, a) for name, (a, _) in allowed.items()}
        for space, kinds in asked.items():
            for kind, q in kinds.items():
                sims = q @ chunk.vectors[space].T
                for name, mask in masks.items():
                    s = sims if mask is None else np.where(mask, sims, -np.inf)
                    merge(best, (space, kind, name), s, ids)
    return {key: ids for key, (_, ids) in best.items()}


def merge(best: dict, key: tuple, sims: np.ndarray, ids: np.ndarray) -> None:
    top = np.argpartition(-sims, min(K, sims.shape[1] - 1), axis=1)[:, :K]
    scores = np.take_along_axis(sims, top, axis=1)
    if key in best:
        scores = np.hstack([best[key][0], scores])
        found = np.hstack([best[key][1], ids[top]])
    else:
        found = ids[top]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    best[key] = (np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1))


def build(kind: str, space: str, generator, count: int, folder: Path):
    """The index of one type over one space, filled chunk by chunk; (index, files written)."""
    dim = generator.real.vectors[space].shape[1]
    factory = faiss_index.resolve_factory(kind, count, dim)
    if kind != "compressed":
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw":
            faiss.downcast_index(inner).hnsw.efConstruction = faiss_index.HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap2(inner)
        for chunk in generator.chunks(count, (space,)):
            index.add_with_ids(chunk.vectors[space], chunk.ids)
        faiss_index.tune_for_search(index)
        faiss_index.write_index(index, folder, space)
        return index, [folder / f"{space}.faiss"]
    codes = faiss.index_factory(dim, compressed.codes_factory(factory), faiss.METRIC_INNER_PRODUCT)
    held = compressed.prepare_training(codes)
    train = min(count, compressed.training_size(factory))
    codes.train(generator.vectors(train, space))
    del held
    compressed.drop_training_state(codes)
    path = compressed.float16_path(folder, space)
    full = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(count, dim))
    for chunk in generator.chunks(count, (space,)):
        codes.add_with_ids(chunk.vectors[space], chunk.ids)
        full[chunk.first : chunk.first + len(chunk.ids)] = chunk.vectors[space]
    full.flush()
    del full
    faiss.write_index(codes, str(folder / f"{space}.faiss"))
    ids = np.arange(1, count + 1, dtype=np.int64)
    np.save(folder / "ids.npy", ids)
    index = compressed.CompressedIndex(codes, np.load(path, mmap_mode="r"), ids)
    return index, [folder / f"{space}.faiss", path]


def measure(index, asked: dict, truth: dict, space: str, allowed: dict) -> dict:
    """p50/p99 ms of single queries and recall@K, per filter (all queries of the space)."""
    result = {}
    for name in ("all", *allowed):
        ids = None if name == "all" else allowed[name][0]
        times, hits, total = [], 0, 0
        for kind, q in asked[space].items():
            for row, query in enumerate(q):
                started = time.perf_counter()
                found = search_within(index, query[None], K, ids, EMPTY)[0]
                times.append(time.perf_counter() - started)
                hits += len({h.id for h in found} & set(truth[(space, kind, name)][row].tolist()))
                total += K
        result[name] = {**percentiles_ms(times, 2), "recall": round(hits / total, 3)}
    return result


def estimate(kind: str, space: str, count: int, known: dict) -> tuple[int, int]:
    """(RAM, disk) bytes an index type takes for `count` images of one space."""
    dim = 512 if space == "joint" else 1280
    ram = known.get((kind, space, "ram")) or faiss_index.ram_per_image(kind, [dim])
    disk = known.get((kind, space, "disk")) or (ram + (2 * dim if kind == "compressed" else 0))
    return int(ram * count), int(disk * count)


def available_ram() -> int:
    with open("/proc/meminfo") as info:
        fields = dict(line.split(":", 1) for line in info)
    return int(fields["MemAvailable"].split()[0]) * 1024


def run_size(real, args, count: int, known: dict) -> list[dict]:
    generator = synthetic.Generator(real, args.seed)
    base = Path(args.folder or tempfile.gettempdir())
    free, ram = shutil.disk_usage(base).free, available_ram()
    meta = int(known.get(("meta", "disk"), META_BYTES) * count)
    print(f"\n== {count:,} images: disk free {free / 1e9:.1f} GB, RAM available {ram / 1e9:.1f} GB")
    plan = []
    for space in args.spaces:
        for kind in args.kinds:
            need_ram, need_disk = estimate(kind, space, count, known)
            fits = need_disk + meta < 0.9 * free and need_ram < 0.7 * ram
            print(
                f"   {space:8s} {kind:10s} needs ~{need_ram / 1e9:.2f} GB RAM, "
                f"~{(need_disk + meta) / 1e9:.2f} GB disk with meta.sqlite"
                + ("" if fits else ": SKIPPED, it does not fit this machine")
            )
            if fits:
                plan.append((space, kind))
    if meta > 0.9 * free or not plan:
        print("   nothing fits: size skipped")
        return []
    folder = Path(tempfile.mkdtemp(prefix=f"archive-{count}-", dir=base))
    results = []
    try:
        seconds, size = write_metadata(real, generator, count, folder)
        known[("meta", "disk")] = size / count
        allowed = filter_ids(folder)
        shares = {n: f"{len(a) / count:.2%} ({ms:.0f} ms ids)" for n, (a, ms) in allowed.items()}
        print(f"   meta.sqlite: {seconds:.0f} s, {size / count:.0f} B/image; filters {shares}")
        asked = queries(real, args.seed, args.queries, args.root)
        asked = {space: kinds for space, kinds in asked.items() if space in args.spaces}
        started = time.perf_counter()
        truth = ground_truth(generator, count, asked, allowed)
        print(f"   exact ground truth: {time.perf_counter() - started:.0f} s")
        for space, kind in plan:
            started = time.perf_counter()
            index, files = build(kind, space, generator, count, folder)
            built = time.perf_counter() - started
            ram_b = faiss_index.ram_bytes(index) / count
            disk_b = sum(p.stat().st_size for p in files) / count
            known[(kind, space, "ram")], known[(kind, space, "disk")] = ram_b, disk_b
            row = {"images": count, "space": space, "kind": kind, "build_s": round(built, 1)}
            row |= {"ram_b": round(ram_b), "disk_b": round(disk_b)}
            row |= measure(index, asked, truth, space, allowed)
            print_row(row)
            results.append(row)
            del index
            for path in files:
                path.unlink()
        print(f"   add 1% / compaction: {segments_note()}")
    finally:
        if args.keep:
            print(f"   kept: {folder}")
        else:
            shutil.rmtree(folder)
    return results


def segments_note() -> str:
    import importlib.util

    if importlib.util.find_spec("index.write.segments") is None:
        return "not measured (no segment writer in index/write yet)"
    return (
        "not measured: index/write/segments.py exists but this bench does not yet write its "
        "archive as a segmented version (VersionWriter) to add to and compact"
    )


def print_row(row: dict) -> None:
    cells = " ".join(
        f"{name} p50/p99 {row[name]['p50_ms']}/{row[name]['p99_ms']} ms r@10 {row[name]['recall']}"
        for name in ("all", *FILTERS)
    )
    print(
        f"   {row['space']:8s} {row['kind']:10s} build {row['build_s']:7.1f} s  "
        f"RAM {row['ram_b']:5d} B/img  disk {row['disk_b']:5d} B/img  {cells}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo-index-cpu"))
    parser.add_argument("--check", action="store_true", help="generator vs real, at 5k")
    parser.add_argument("--sizes", default="1M,5M,10M")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--spaces", default=",".join(synthetic.SPACES))
    parser.add_argument("--queries", type=int, default=100, help="per query kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, help="where the indexes are written (temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep each size's files")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.spaces = [s for s in args.spaces.split(",") if s]
    faiss.omp_set_num_threads(1)
    if args.check:
        check(args.root, args.seed)
        return
    real = synthetic.fit(args.root)
    print(f"machine: {os.cpu_count()} CPUs; one FAISS thread; generator fitted to {args.root}")
    known: dict = {}
    results = []
    for count in sorted(parse_size(s) for s in args.sizes.split(",")):
        results += run_size(real, args, count, known)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
