"""Serving a format-2 version (issue 25: several segments and deleted ids, index/version.py): every
query answers exactly as a format-1 version holding the same live images does.

Three real small indexes of real shared-dataset images (the rows of tests/test_index_search.py,
same bundle): a build of A, a build of B, and a build of the live images (A without a few, and B).
The format-2 version is assembled by hand as the segments format says: A's version as the first
segment, B's copied to ROOT/segments/000002, a version.json listing both and deleted.npy holding
the few ids of A. Then search (both spaces, filters, keywords, exclusions), similar_to_id,
similarity, vectors_of, group_members, facets, get/get_many/thumbnail, rank_text (both modes,
both fusions), the sentences, count and ids are compared with the live build's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_index_search as search_tests
from conftest import built_root, write_csv

from convirt.hashing import sha256_file
from index import layout
from index.errors import CorruptVersionError
from index.read.keywords import Keywords
from index.read.segmented import SegmentedStore
from index.read.store import open_current
from index.sources.manifest import read_manifest

manifest_rows = search_tests.manifest_rows
FIELDS = search_tests.FIELDS
DROPPED = (1, 4, 13)  # rows of A the format-2 version deletes (one of them has an effusion)


def build(folder: Path, bundle, rows: list[dict[str, str]]) -> Path:
    """A real index of rows, from a manifest at one path for all three builds (rows store it)."""
    manifest = write_csv(folder.parent / "manifest.csv", rows, FIELDS)
    return built_root(folder, bundle, read_manifest(manifest))


def segmented_root(root_a: Path, root_b: Path, out: Path, deleted: np.ndarray) -> Path:
    """A's root with B's version as a second segment and `deleted`, published as version 2."""
    shutil.copytree(root_a, out)
    first = layout.current_version_dir(out)
    second = out / "segments" / "000002"
    shutil.copytree(layout.current_version_dir(root_b), second)
    version = out / "versions" / "000002"
    version.mkdir()
    np.save(version / "deleted.npy", np.sort(deleted).astype(np.int64))
    info_a = json.loads((first / "version.json").read_text())
    info_b = json.loads((second / "version.json").read_text())
    info = {
        **info_a,
        "format": 2,
        "version": "000002",
        "segments": [f"versions/{first.name}", "segments/000002"],
        "deleted": len(deleted),
        "count": info_a["count"] + info_b["count"] - len(deleted),
        "parent": first.name,
        "checksums": {"deleted.npy": sha256_file(version / "deleted.npy")},
    }
    (version / "version.json").write_text(json.dumps(info))
    (out / "CURRENT").write_text("000002")
    return out


@pytest.fixture(scope="module")
def roots(tmp_path_factory, bundle_dir, manifest_rows) -> tuple[Path, Path]:
    """(the format-2 root, the root of one build of its live images)."""
    half = len(manifest_rows) * 3 // 5
    rows_a, rows_b = manifest_rows[:half], manifest_rows[half:]
    live = [row for n, row in enumerate(rows_a) if n not in DROPPED] + rows_b
    folder = tmp_path_factory.mktemp("segmented")
    root_a = build(folder / "a", bundle_dir, rows_a)
    root_b = build(folder / "b", bundle_dir, rows_b)
    root_live = build(folder / "live", bundle_dir, live)
    with open_current(root_a) as store_a:
        paths = {row["path"]: i for i, row in store_a.get_many(store_a.ids.tolist()).items()}
    deleted = np.array([paths[rows_a[n]["image"]] for n in DROPPED], np.int64)
    return segmented_root(root_a, root_b, folder / "two", deleted), root_live


@pytest.fixture(scope="module")
def stores(roots):
    with open_current(roots[0]) as two, open_current(roots[1]) as one:
        yield two, one


def same_hits(found, expected) -> None:
    assert [hit.id for hit in found] == [hit.id for hit in expected]
    assert np.allclose([h.score for h in found], [h.score for h in expected], atol=1e-5)


def test_ids_count_vectors_and_rows_equal_one_build(stores):
    two, one = stores
    assert isinstance(two, SegmentedStore) and not isinstance(one, SegmentedStore)
    assert two.count == one.count and np.array_equal(two.ids, one.ids)
    ids = one.ids.tolist()[::-1]
    for space in ("joint", "encoder"):
        assert np.allclose(two.vectors_of(ids, space), one.vectors_of(ids, space), atol=1e-5)
        assert np.allclose(two.vectors[space][3], one.vectors[space][3], atol=1e-5)
        vector = search_tests.query(one, space)
        assert np.allclose(two.similarity(space, vector, ids), one.similarity(space, vector, ids))
    assert two.get_many(ids) == one.get_many(ids)
    assert all(two.thumbnail(i) == one.thumbnail(i) for i in ids)
    assert two.get(ids[0]) == one.get(ids[0])


def test_deleted_ids_are_gone_everywhere(stores, roots):
    two, _ = stores
    deleted = np.load(layout.current_version_dir(roots[0]) / "deleted.npy")
    for image_id in deleted.tolist():
        assert two.get(image_id) is None and two.thumbnail(image_id) is None
        with pytest.raises(KeyError):
            two.vectors_of([image_id], "joint")
    assert not set(deleted.tolist()) & set(two.sentences.images.tolist())


@pytest.mark.parametrize("space", ["joint", "encoder"])
def test_search_with_filters_keywords_and_exclusions(stores, space):
    two, one = stores
    exclude = set(one.ids[::5].tolist())
    cases = [
        {},
        {"filters": {"modality": ["CT", "MR", "XR"]}},
        {"filters": {"age": {"gte": 30}}},
        {"filters": {"study_date": {"gte": "2019-03-01", "lte": "2020-06-30"}}},
        {"filters": {"sex": "F"}, "exclude": exclude},
        {"keywords": Keywords(must=("effusion",))},
        {"keywords": Keywords(must_not=("effusion", "pneumothorax")), "exclude": exclude},
        {"filters": {"dose": {"lte": 10}}, "keywords": Keywords(must="pleural")},
    ]
    for seed in range(3):
        vector = search_tests.query(one, space, seed)
        for options in cases:
            for k in (1, 5, one.count):
                same_hits(
                    two.search(space, vector, k, **options), one.search(space, vector, k, **options)
                )
    batch = np.stack([search_tests.query(one, space, seed) for seed in range(4)])
    for found, expected in zip(
        two.search_image_vectors(batch, 7, space=space),
        one.search_image_vectors(batch, 7, space=space),
        strict=True,
    ):
        same_hits(found, expected)
    for image_id in one.ids[::4].tolist():
        same_hits(
            two.similar_to_id(image_id, 6, space=space), one.similar_to_id(image_id, 6, space=space)
        )


def test_group_members_and_facets(stores, manifest_rows):
    two, one = stores
    for field in ("sex", "age", "study_date", "modality"):
        keys = sorted({row.get(field, "") for row in manifest_rows} - {""})
        assert two.group_members(field, keys) == one.group_members(field, keys), field
        assert two.group_members(field, keys, filters={"sex": "M"}) == one.group_members(
            field, keys, filters={"sex": "M"}
        )

    def comparable(facet):  # a range's distinct is the sum of the segments' (documented)
        return (facet.field, facet.kind, facet.values, facet.low, facet.high, facet.count) + (
            (facet.distinct,) if facet.kind == "values" else ()
        )

    assert [comparable(f) for f in two.facets(1000)] == [comparable(f) for f in one.facets(1000)]
    assert {f.kind for f in one.facets()} == {"values", "range"}


@pytest.mark.parametrize("mode", ["hybrid", "report"])
@pytest.mark.parametrize("fusion", ["weighted", "rrf"])
def test_rank_text_and_sentences(stores, mode, fusion):
    two, one = stores
    assert two.sentences is not None and one.sentences is not None
    assert two.sentences.texts == one.sentences.texts
    assert np.array_equal(two.sentences.pair_sentence, one.sentences.pair_sentence)
    assert np.array_equal(two.sentences.images, one.sentences.images)
    assert np.allclose(two.sentences.vectors, one.sentences.vectors, atol=1e-5)
    exclude = set(one.ids[::6].tolist())
    for text in ("pleural effusion", "no pneumothorax", "left lung opacity", "fracture"):
        vector = search_tests.query(one, "joint", len(text))
        for options in ({}, {"exclude": exclude}, {"filters": {"sex": "F"}}):
            found = two.rank_text(vector, text, 8, mode=mode, fusion=fusion, **options)
            expected = one.rank_text(vector, text, 8, mode=mode, fusion=fusion, **options)
            found_hits, expected_hits = found.top(8), expected.top(8)
            same_hits(found_hits, expected_hits)
            assert [h.evidence.terms for h in found_hits] == [
                h.evidence.terms for h in expected_hits
            ]
            assert [h.evidence.lexical for h in found_hits] == pytest.approx(
                [h.evidence.lexical for h in expected_hits], abs=1e-6
            )
            assert [h.evidence.sentence for h in found_hits] == [
                h.evidence.sentence for h in expected_hits
            ]
            some = one.ids[::3]
            same_hits(found.score(some), expected.score(some))


def test_a_missing_or_damaged_segment_names_it(roots, tmp_path):
    broken = shutil.copytree(roots[0], tmp_path / "missing")
    shutil.rmtree(broken / "segments" / "000002")
    with pytest.raises(CorruptVersionError, match="segments/000002"):
        open_current(broken)
    damaged = shutil.copytree(roots[0], tmp_path / "damaged")
    faiss_file = damaged / "segments" / "000002" / "joint.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    with pytest.raises(CorruptVersionError, match=r"000002.*joint\.faiss"):
        open_current(damaged)
    deleted = shutil.copytree(roots[0], tmp_path / "deleted")
    np.save(deleted / "versions" / "000002" / "deleted.npy", np.zeros(1, np.int64))
    with pytest.raises(CorruptVersionError, match=r"deleted\.npy"):
        open_current(deleted)


def test_a_format_1_version_still_serves(roots, tmp_path):
    old = shutil.copytree(roots[0], tmp_path / "old")
    (old / "CURRENT").write_text("000001")
    with open_current(old) as store:
        assert not isinstance(store, SegmentedStore) and store.count > 0
        assert store.search("joint", search_tests.query(store), 3)
