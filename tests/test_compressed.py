"""The compressed index type (index/compressed.py) on real vectors: about 3,000 images of the shared
datasets embedded by the test bundle's pretrained encoder at 32 px (conftest's `real_flat_root`,
shared with the HNSW tests; the demo's 5,456 vectors: docs/benchmarks.md).

Recall is measured against exact search; filters, keywords, exclusions, similar-to-id and refined
queries must answer as the same version under flat does: ids in the same order, where two ids may
swap only when their exact scores tie within float16 precision (the re-ranking reads float16)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import REAL_FIELDS, opened_pair, read_rows, real_pair, real_rows, write_csv

from index import compressed, faiss_index
from index.read.keywords import Keywords
from index.read.store import IndexStore, open_current
from index.sources.manifest import read_manifest
from index.write import checks, rewrite
from index.write.build import Options, add


@pytest.fixture(scope="module")
def roots(real_flat_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(flat root, compressed root): the real index, then `reindex --index-type compressed`."""
    return real_pair(real_flat_root, tmp_path_factory.mktemp("compressed"), "compressed")


@pytest.fixture(scope="module")
def stores(roots) -> Iterator[tuple[IndexStore, IndexStore]]:
    yield from opened_pair(roots)


def test_compressed_version_holds_codes_and_float16_vectors(roots, stores):
    flat, small = stores
    assert flat.info["factory"] == {"joint": "Flat", "encoder": "Flat"}  # the small end: exact
    assert small.count == flat.count > 2500
    factories = small.info["factory"]
    for space in ("joint", "encoder"):  # 64-byte codes of every dimension: no PCA
        assert factories[space] == f"compressed:IVF{compressed.list_count(small.count)},PQ64"
    for space in ("joint", "encoder"):
        index = small.indexes[space]
        assert isinstance(index, compressed.CompressedIndex)
        assert index.full.dtype == np.float16 and isinstance(index.full, np.memmap)
        np.testing.assert_allclose(index.full[:50], flat.vectors[space][:50], atol=1e-3)
        # the float16 copy is the only one: no float32 {space}.npy beside it
        assert not (small.files.directory / f"{space}.npy").exists()
        assert small.vectors[space].dtype == np.float16
    info = checks.info(roots[1])
    flat_info = checks.info(roots[0])
    for space in ("joint", "encoder"):  # codes + ids, with the PCA's and lists' fixed cost at 3k
        assert info["ram_bytes_per_image"][space] < flat_info["ram_bytes_per_image"][space] / 2
    # float16 on disk instead of float32 (thumbnails and reports weigh the same in both)
    vectors = sum(flat_info["sizes_bytes"][f"{space}.npy"] for space in ("joint", "encoder"))
    assert info["total_bytes"] < flat_info["total_bytes"] - vectors / 3
    # the checksums of the float16 files, the codes' ids against ids.npy: nothing flat lacks
    # (a blank image's encoder features at 32 px are zero: verify says so of both)
    assert checks.verify(roots[1]).problems == checks.verify(roots[0]).problems


def test_recall_at_10_against_exact_search_is_at_least_095(roots, stores):
    flat, small = stores
    recorded = small.info["recall_at_10"]
    assert recorded["joint"] >= 0.95 and recorded["encoder"] >= 0.95
    assert checks.info(roots[1])["recall_at_10"] == recorded
    rng = np.random.default_rng(7)
    for space in ("joint", "encoder"):
        hits = 0
        queries = rng.choice(small.ids, size=100, replace=False)
        for image_id in queries:  # itself excluded, as a "similar images" query does
            exact = {h.id for h in flat.similar_to_id(int(image_id), 10, space=space)}
            found = {h.id for h in small.similar_to_id(int(image_id), 10, space=space)}
            hits += len(exact & found)
        assert hits / (10 * len(queries)) >= 0.95, space


def ranked(hits) -> list[int]:
    return [hit.id for hit in hits]


# Two images whose exact scores differ by less than this may swap: the re-ranking reads float16,
# whose rounding moves a cosine of unit vectors by at most 2**-11 (Cauchy-Schwarz), so a pair's gap
# by at most 2 * 2**-11.
FLOAT16_TIE = 2 * 2**-11


def assert_same_ranking(flat: IndexStore, space: str, vector, expected, found) -> None:
    """`found` holds flat's answer `expected`: the same number of hits, and at each rank the same
    id or one whose exact score ties flat's there within float16 precision (ties by id)."""
    assert len(found) == len(expected)
    exact = flat.similarity(space, vector, ranked(found)) if found else []
    for rank, (want, got) in enumerate(zip(expected, found, strict=True)):
        if got.id != want.id:
            assert abs(exact[rank] - want.score) <= FLOAT16_TIE, (rank, want, got)
    assert len(set(ranked(found)) ^ set(ranked(expected))) <= 2  # at most a tie at the cut


def test_filters_keywords_exclusions_answer_as_flat(stores):
    flat, small = stores
    vector = flat.vectors["joint"][11]
    queries = [
        dict(filters={"modality": "CT"}),
        dict(filters={"dataset": ["covid-ct", "covid-cxr"]}),
        dict(keywords=Keywords(must=("pneumonia",))),
        dict(keywords=Keywords(must_not=("covid",)), filters={"dataset": "covid-cxr"}),
        dict(filters={"dataset": "medpix"}, exclude=set(flat.ids[:500].tolist())),
    ]
    for query in queries:
        for k in (1, 10, 80):
            expected = flat.search("joint", vector, k, **query)
            assert expected, query
            found = small.search("joint", vector, k, **query)
            assert_same_ranking(flat, "joint", vector, expected, found)


def test_similar_refined_and_grouped_answer_as_flat(stores):
    flat, small = stores
    for image_id in flat.ids[[3, 400, 1500, 2500]].tolist():
        for filters in ({"dataset": "roco"}, {"modality": ["CT", "MR", "MRI"]}):
            expected = flat.similar_to_id(image_id, 20, filters)
            found = small.similar_to_id(image_id, 20, filters)
            assert_same_ranking(
                flat, "encoder", flat.vectors_of([image_id], "encoder")[0], expected, found
            )
    liked = flat.ids[[10, 20, 30]]
    refined = flat.vectors_of(liked, "encoder").mean(axis=0)  # a query moved toward likes
    np.testing.assert_allclose(
        small.vectors_of(liked, "encoder"), flat.vectors_of(liked, "encoder"), atol=1e-3
    )
    expected = flat.search("encoder", refined, 10, {"dataset": "roco"}, exclude=liked)
    found = small.search("encoder", refined, 10, {"dataset": "roco"}, exclude=liked)
    assert_same_ranking(flat, "encoder", refined, expected, found)
    keys, filters = ["1", "2", "MPX1009"], {"dataset": "covid-cxr"}
    groups = flat.group_members("group", keys, filters)
    assert groups and small.group_members("group", keys, filters) == groups


def test_unfiltered_and_broad_filters_return_k_allowed_hits(stores, monkeypatch):
    """Through the codes (no exact scan): a grouped search that over-fetches gets as many hits
    as it asked for, all allowed, none excluded, scored exactly."""
    flat, small = stores
    monkeypatch.setattr(compressed, "EXACT_SCAN_MAX", 0)
    vector = flat.vectors["encoder"][42]
    roco = {hit.id for hit in flat.search("encoder", vector, flat.count, {"dataset": "roco"})}
    excluded = set(list(roco)[:100])
    for k in (10, 400, 2000):
        hits = small.search("encoder", vector, k, {"dataset": "roco"}, exclude=excluded)
        assert len(hits) == min(k, len(roco) - len(excluded))
        assert {hit.id for hit in hits} <= roco - excluded
        exact = flat.similarity("encoder", vector, ranked(hits))
        np.testing.assert_allclose([hit.score for hit in hits], exact, atol=1e-3)
    recall_hits = 0
    for image_id in flat.ids[::150][:20].tolist():  # recall through the codes under a filter
        query = flat.vectors_of([image_id], "encoder")[0]
        exact = ranked(flat.search("encoder", query, 10, {"dataset": "roco"}))
        recall_hits += len(
            set(exact) & set(ranked(small.search("encoder", query, 10, {"dataset": "roco"})))
        )
    assert recall_hits / 200 >= 0.95
    unfiltered = small.search("encoder", vector, 2000)
    assert len(unfiltered) == 2000 and len({hit.id for hit in unfiltered}) == 2000
    best = ranked(flat.search("encoder", vector, 10))
    assert len(set(best) & set(ranked(unfiltered[:10]))) >= 9


def test_probes_grow_with_the_lists_and_with_a_filters_selectivity(stores):
    """An unfiltered search probes max(16, 1.5 sqrt(nlist)) lists; under a filter, lists nearest
    first until they hold as many allowed images (estimated) as an unfiltered search scans."""
    assert [compressed.probes(n) for n in (10, 54, 316, 3162)] == [10, 16, 27, 85]
    flat, small = stores
    index = small.indexes["encoder"]
    query = flat.vectors["encoder"][42]
    scanned = index.nprobe * index.ntotal / index.ivf.nlist
    for spec in ({"dataset": "roco"}, {"dataset": "covid-ct"}):
        allowed = np.array(sorted(h.id for h in flat.search("encoder", query, flat.count, spec)))
        per_list = index._allowed_per_list(allowed)
        assert abs(per_list.sum() - len(allowed)) < 1e-6 * len(allowed) + 1e-9
        nprobe = index._filtered_probes(query, per_list)
        assert index.nprobe <= nprobe <= index.ivf.nlist
        held = np.sort(per_list)[::-1][:nprobe].sum()  # at most what the nprobe fullest hold
        assert nprobe == index.ivf.nlist or held >= scanned


def test_lists_found_by_hnsw_train_and_search_as_well(stores, monkeypatch):
    """From HNSW_QUANTISER_MIN lists (1M images) an HNSW graph over the centroids assigns vectors
    to lists, in k-means and in add: forced here on the real vectors, recall stays >= 0.95,
    unfiltered and under a filter searched through the codes."""
    flat, _ = stores
    monkeypatch.setattr(compressed, "EXACT_SCAN_MAX", 0)
    vectors = np.ascontiguousarray(flat.vectors["joint"], dtype=np.float32)
    index = compressed.build("compressed:IVF40_HNSW32,PQ64", vectors, flat.ids)
    assert isinstance(faiss.downcast_index(index.ivf.quantizer), faiss.IndexHNSWFlat)
    allowed = np.sort(flat.ids[::3])
    rows = np.random.default_rng(3).choice(len(vectors), size=50, replace=False)
    for restriction, pool in (
        (None, np.arange(len(vectors))),
        (compressed.Restriction(allowed), np.arange(0, len(vectors), 3)),
    ):
        exact = np.argsort(-(vectors[pool] @ vectors[rows].T), axis=0, kind="stable")[:10].T
        _, found = index.search(vectors[rows], 10, restriction)
        assert restriction is None or np.isin(found, allowed).all()
        hits = sum(len(set(flat.ids[pool[e]]) & set(f)) for e, f in zip(exact, found, strict=True))
        assert hits / found.size >= 0.95


def test_auto_chooses_from_the_ram_budget():
    dims = [512, 1280]
    assert faiss_index.choose_auto(5456, dims) == "flat"  # the demo index: exact, as before
    assert faiss_index.choose_auto(5456, dims, ram_budget=2**30) == "flat"
    assert faiss_index.choose_auto(10_000_000, dims) == "hnsw"
    assert faiss_index.choose_auto(10_000_000, dims, ram_budget=200 * 2**30) == "hnsw"
    assert faiss_index.choose_auto(10_000_000, dims, ram_budget=8 * 2**30) == "compressed"
    assert faiss_index.choose_auto(100_000, dims, ram_budget=2**20) == "compressed"
    assert faiss_index.choose_auto(100, dims, ram_budget=1) == "flat"  # too few to train codes


def test_reindexed_back_to_flat_from_its_float16_copy(roots, stores, tmp_path):
    """The float16 vectors are a compressed version's source of truth: reindexing it as flat
    writes float32 vectors equal to the original build's within float16 precision."""
    flat, _ = stores
    shutil.copytree(roots[1], tmp_path / "back")
    rewrite.reindex(tmp_path / "back", "flat")
    with open_current(tmp_path / "back") as back:
        assert back.info["factory"] == {"joint": "Flat", "encoder": "Flat"}
        assert np.array_equal(back.ids, flat.ids)
        for space in ("joint", "encoder"):
            assert back.vectors[space].dtype == np.float32
            np.testing.assert_allclose(back.vectors[space], flat.vectors[space], atol=1e-3)
        vector = flat.vectors["joint"][7]
        expected = flat.search("joint", vector, 20, {"dataset": "medpix"})
        found = back.search("joint", vector, 20, {"dataset": "medpix"})
        assert_same_ranking(flat, "joint", vector, expected, found)


@pytest.fixture(scope="module")
def two_segments(real_flat_root: Path, roots, datasets: Path, tmp_path_factory):
    """(flat, compressed): each the real index plus the same 40 further medpix images added as a
    second segment (a small flat one), through `convirt index add`'s code."""
    folder = tmp_path_factory.mktemp("segments")
    known = {row["image"] for row in real_rows(datasets)}
    extra = []
    for row in read_rows(datasets / "medpix" / "manifest.csv"):
        image = str(datasets / "medpix" / row["image"])
        if image not in known and len(extra) < 40:
            known.add(image)
            modality = row.get("modality") or row.get("modality_keyword") or ""
            extra.append(dict(image=image, text="", dataset="medpix", modality=modality, group=""))
    manifest = write_csv(folder / "extra.csv", extra, REAL_FIELDS)
    bundle = real_flat_root.parent / "bundle"
    options = Options(batch_size=64, workers=2, progress=False)
    pair = []
    for name, source in (("flat", real_flat_root), ("compressed", roots[1])):
        shutil.copytree(source, folder / name)
        add(folder / name, bundle, read_manifest(manifest), options)
        pair.append(folder / name)
    yield from opened_pair(tuple(pair))


def test_a_compressed_segment_beside_another_answers_filters_as_flat(two_segments):
    """Each segment is asked only for its own allowed ids: a compressed segment mapping another
    segment's ids to its rows once raised IndexError or returned images the filter excluded."""
    flat, small = two_segments
    assert len(small.files.segment_dirs) == 2 and small.count == flat.count
    assert small.info["factory"]["joint"].startswith("compressed:")
    added = sorted(set(small.ids.tolist()) - set(np.load(small.files.segment_dirs[0] / "ids.npy")))
    vector = flat.vectors_of([added[3]], "joint")[0]
    queries = [
        dict(filters={"dataset": "medpix"}),  # both segments, exact scan in the compressed one
        dict(filters={"dataset": ["medpix", "roco", "covid-ct"]}),  # beyond the exact scan
        dict(filters={"modality": "CT"}),
        dict(filters={"dataset": "medpix"}, exclude=set(added[:5])),
    ]
    for query in queries:
        for k in (10, 60):
            expected = flat.search("joint", vector, k, **query)
            found = small.search("joint", vector, k, **query)
            assert_same_ranking(flat, "joint", vector, expected, found)
    for image_id in (added[0], int(flat.ids[100])):
        expected = flat.similar_to_id(image_id, 20, {"dataset": "medpix"})
        found = small.similar_to_id(image_id, 20, {"dataset": "medpix"})
        encoder = flat.vectors_of([image_id], "encoder")[0]
        assert_same_ranking(flat, "encoder", encoder, expected, found)
