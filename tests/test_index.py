"""The index: real FAISS, real SQLite, real images from the shared datasets, a real bundle.

One archive (medpix + covid-cxr JPEGs at several depths, two DICOM files, a duplicate and three
broken files) is built once per module; tests that change an index work on a copy of it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import built_root, make_bundle
from PIL import Image

from convirt.bundle import load_bundle
from convirt.cachebuild import Resolver
from convirt.imagecache import ImageCache
from convirt.imageio import load_image
from convirt.inference import Embedder
from index import cli, layout
from index.errors import IndexLockedError, IndexSpecError, IndexStoreError, ModelMismatchError
from index.faiss_index import AUTO_EXACT_MAX, HNSW_M, resolve_factory
from index.read.store import open_current
from index.sources.base import shard_of
from index.sources.folder import scan_folder
from index.sources.manifest import read_manifest
from index.write.build import Options, add, build
from index.write.checks import info, verify
from index.write.merge import merge
from index.write.rewrite import reindex, remove
from index.write.staging import STAGING_DB

REPO = Path(__file__).resolve().parents[1]
OPTIONS = Options(batch_size=4, chunk_batches=1, workers=2, progress=False)
JOB_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "2", "--no-progress"]
DICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
BROKEN = {"bad/truncated.jpg", "bad/not_an_image.png", "bad/empty.jpg"}
IMAGES_INDEXED = 24 + 8 + 2  # medpix + covid-cxr + DICOM; the duplicate and broken files are not


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(bundle_dir) -> Embedder:
    return Embedder(load_bundle(bundle_dir))


@pytest.fixture(scope="module")
def medpix_images(datasets) -> list[Path]:
    return sorted((datasets / "medpix" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory, datasets, medpix_images) -> Path:
    """A folder tree of real images at several depths, with DICOM, a duplicate and broken files."""
    root = tmp_path_factory.mktemp("archive")
    for n, image in enumerate(medpix_images[:24]):
        copy(image, root / "medpix" / ("a/b" if n % 2 else "a") / image.name)
    for image in sorted((datasets / "covid-cxr" / "images").glob("*.jpg"))[:8]:
        copy(image, root / "covid" / image.name)
    copy(DICOM_FILES / "CT_small.dcm", root / "dicom" / "CT_small.dcm")
    copy(DICOM_FILES / "MR_small.dcm", root / "dicom" / "series" / "IM0001")  # no suffix
    copy(medpix_images[0], root / "other" / "same_as_first.jpg")
    data = medpix_images[30].read_bytes()
    write(root / "bad" / "truncated.jpg", data[: len(data) // 3])
    write(root / "bad" / "not_an_image.png", b"this is a text file, not a PNG\n")
    write(root / "bad" / "empty.jpg", b"")
    write(root / "notes.txt", b"not an image suffix: never scanned\n")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, archive, bundle_dir) -> Path:
    return built_root(tmp_path_factory.mktemp("index"), bundle_dir, scan_folder(archive), OPTIONS)


def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def copy_root(root: Path, target: Path) -> Path:
    shutil.copytree(root, target)
    return target


def report_of(root: Path) -> dict:
    return json.loads((layout.current_version_dir(root) / "build_report.json").read_text())


def snapshot(root: Path) -> dict:
    """Everything two equal index versions must share (not timings)."""
    with open_current(root) as store:
        rows = store.get_many(store.ids.tolist())
        return {
            "ids": store.ids.tolist(),
            "rows": rows,
            "thumbnails": {i: store.thumbnail(i) for i in store.ids.tolist()},
            "joint": np.asarray(store.vectors["joint"]),
            "encoder": np.asarray(store.vectors["encoder"]),
            "skipped": sorted((s["path"], s["reason"]) for s in report_of(root)["skipped"]),
        }


def assert_same_index(a: dict, b: dict, exact: bool) -> None:
    assert a["ids"] == b["ids"]
    assert a["rows"] == b["rows"]
    assert a["thumbnails"] == b["thumbnails"]
    assert a["skipped"] == b["skipped"]
    for space in ("joint", "encoder"):
        if exact:
            assert np.array_equal(a[space], b[space]), space
        else:  # other batch compositions: the same up to float rounding
            np.testing.assert_allclose(a[space], b[space], atol=1e-5)


def first_jpg(folder: Path) -> Path:
    return sorted(folder.glob("*.jpg"))[0]


def id_of(store, path: Path) -> int:
    """The id an image is stored under, in whichever segment of the version holds it."""
    for directory in store.files.segment_dirs:
        with closing(sqlite3.connect(directory / "meta.sqlite")) as conn:
            row = conn.execute("SELECT id FROM images WHERE path = ?", (str(path),)).fetchone()
        if row:
            return row[0]
    raise AssertionError(f"{path} is not indexed")


# -- build and search ------------------------------------------------------------------------------


def test_search_returns_the_query_image_first(built, archive, embedder):
    queries = [
        first_jpg(archive / "medpix" / "a" / "b"),
        first_jpg(archive / "covid"),
        archive / "dicom" / "series" / "IM0001",
    ]
    encoder, joint = embedder.embed_images([load_image(p) for p in queries])
    with open_current(built, expected_fingerprint=embedder.bundle.fingerprint) as store:
        assert store.count == IMAGES_INDEXED
        for query, by_encoder, by_joint in zip(
            queries,
            store.search_image_vectors(encoder, 5),
            store.search_image_vectors(joint, 5, space="joint"),
            strict=True,
        ):
            assert store.get(by_encoder[0].id)["path"] == str(query)
            assert store.get(by_joint[0].id)["path"] == str(query)
            assert by_encoder[0].score == pytest.approx(1.0, abs=1e-4)
            assert len(by_encoder) == 5
        similar = store.similar_to_id(by_encoder[0].id, k=4)
        assert len(similar) == 4 and by_encoder[0].id not in {h.id for h in similar}
        text = embedder.embed_texts(["Bilateral patchy opacities in both lungs."]).vectors
        scores = [hit.score for hit in store.search_text_vectors(text, k=7)[0]]
        assert len(scores) == 7 and scores == sorted(scores, reverse=True)


def test_metadata_thumbnails_and_filters(built, archive):
    image = first_jpg(archive / "covid")
    with open_current(built) as store:
        row = store.get(id_of(store, image))
        assert row["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        assert (row["width"], row["height"]) == Image.open(image).size
        assert row["relpath"] == f"covid/{image.name}" and row["size_bytes"] == image.stat().st_size
        thumbnail = Image.open(io.BytesIO(store.thumbnail(row["id"])))
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == 128
        ct = store.get(id_of(store, archive / "dicom" / "CT_small.dcm"))
        assert ct["modality"] == "CT" and ct["meta"]["StudyInstanceUID"]
        query = np.ones(store.info["dims"]["encoder"], np.float32)
        only_ct = store.search_image_vectors(query, k=10, filters={"modality": "CT"})[0]
        assert [h.id for h in only_ct] == [ct["id"]]
        assert store.search_image_vectors(query, k=3, filters={"modality": "US"}) == [[]]
        assert store.get(12345) is None and store.thumbnail(12345) is None
        with pytest.raises(ValueError, match="filter field"):
            store.search_text_vectors(np.ones(512, np.float32), filters={"a'); drop": 1})


def test_broken_files_are_skipped_and_duplicates_reported(built, archive):
    report = report_of(built)
    skipped = {
        Path(s["path"]).relative_to(archive).as_posix(): s["reason"] for s in report["skipped"]
    }
    assert set(skipped) == BROKEN
    assert "truncated" in skipped["bad/truncated.jpg"]
    assert "not a recognised image format" in skipped["bad/not_an_image.png"]
    assert "empty file" in skipped["bad/empty.jpg"]
    [duplicate] = report["duplicates"]
    assert duplicate["path"] == str(archive / "other" / "same_as_first.jpg")
    assert report["counts"] == {
        "embedded": IMAGES_INDEXED,
        "resumed": 0,
        "skipped": 3,
        "duplicates": 1,
    }
    with open_current(built) as store:
        assert store.get(duplicate["id"])["duplicates"] == [duplicate["path"]]
        assert store.get(duplicate["id"])["path"] == duplicate["duplicate_of"]


def test_manifest_build_keeps_columns_reports_and_filters(medpix_subset, bundle_dir, tmp_path):
    root = tmp_path / "root"
    build(root, bundle_dir, read_manifest(medpix_subset), OPTIONS)
    with open(medpix_subset, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    with open_current(root) as store:
        assert store.count == len({r["image"] for r in rows})
        row = store.get(id_of(store, (medpix_subset.parent / first["image"]).resolve()))
        assert row["report"] == first["text"].strip() and row["modality"] == first["type"]
        assert row["meta"]["modality_original"] == first["modality"]  # normalised, kept (24)
        assert row["meta"]["location_category"] == first["location_category"]
        assert row["meta"]["split"] == first["split"]
        query = np.ones(512, np.float32)
        wanted = first["location_category"]
        hits = store.search_text_vectors(query, k=50, filters={"location_category": wanted})[0]
        expected = {r["image"] for r in rows if r["location_category"] == wanted}
        assert len(hits) == len(expected) < store.count
        assert {store.get(h.id)["meta"]["location_category"] for h in hits} == {wanted}


def test_jsonl_manifest_reports_missing_files(medpix_images, bundle_dir, tmp_path):
    lines = [
        {"image": str(p), "text": f"report {n}", "modality": "CT"}
        for n, p in enumerate(medpix_images[40:42])
    ]
    lines.append({"image": "nowhere/missing.jpg", "text": "gone", "modality": "CT"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    build(tmp_path / "root", bundle_dir, read_manifest(manifest), OPTIONS)
    [missing] = report_of(tmp_path / "root")["skipped"]
    assert missing["path"].endswith("nowhere/missing.jpg") and "not found" in missing["reason"]
    with open_current(tmp_path / "root") as store:
        assert store.count == 2 and store.get(store.ids[0])["report"].startswith("report")


# -- add, remove, reindex --------------------------------------------------------------------------


def test_add_embeds_only_new_images_and_remove_by_id_and_path(
    built, medpix_images, archive, embedder, tmp_path
):
    root = copy_root(built, tmp_path / "root")
    before = snapshot(root)
    new = tmp_path / "new"
    added = [copy(p, new / p.name) for p in medpix_images[50:53]]
    copy(first_jpg(archive / "covid"), new / "again.jpg")
    summary = add(root, embedder.bundle, scan_folder(new), OPTIONS)
    assert summary.changes["embedded"] == 3 and summary.count == IMAGES_INDEXED + 3
    assert summary.version == "000002" and info(root)["version"] == "000002"
    assert layout.list_versions(root) == ["000001", "000002"]
    after = snapshot(root)
    old_rows = np.searchsorted(after["ids"], before["ids"])
    for space in ("joint", "encoder"):  # old vectors copied, not recomputed
        assert np.array_equal(after[space][old_rows], before[space])
    encoder, _ = embedder.embed_images([load_image(p) for p in added])
    with open_current(root) as store:
        hits = store.search_image_vectors(encoder, 1)
        assert [store.get(h[0].id)["path"] for h in hits] == [str(p) for p in added]
        assert (
            str(new / "again.jpg")
            in store.get(id_of(store, first_jpg(archive / "covid")))["duplicates"]
        )
        gone_id = hits[0][0].id
    summary = remove(root, ids=[gone_id], paths=["medpix/a/" + medpix_images[0].name])
    assert summary.count == IMAGES_INDEXED + 1 and summary.version == "000003"
    with open_current(root) as store:
        assert store.get(gone_id) is None
        everything = store.search_image_vectors(encoder, store.count)[0]
        assert gone_id not in {h.id for h in everything} and len(everything) == store.count
    assert verify(root).ok
    with pytest.raises(IndexStoreError, match="id 123"):
        remove(root, ids=[123])


def test_reindex_changes_the_structure_not_the_vectors(built, archive, embedder, tmp_path):
    assert resolve_factory("auto", AUTO_EXACT_MAX - 1, 512) == "Flat"
    assert resolve_factory("auto", AUTO_EXACT_MAX, 512) == f"HNSW{HNSW_M}"
    assert resolve_factory("ivfpq", 100_000, 512) == "IVF1264,PQ32"
    root = copy_root(built, tmp_path / "root")
    reindex(root, "HNSW16,Flat")
    query = first_jpg(archive / "covid")
    encoder, _ = embedder.embed_images([load_image(query)])
    with open_current(root) as store:
        assert store.info["factory"] == {"joint": "HNSW16,Flat", "encoder": "HNSW16,Flat"}
        assert store.info["recall_at_10"]["joint"] > 0.9
        assert store.get(store.search_image_vectors(encoder, 3)[0][0].id)["path"] == str(query)
        only_ct = store.search_image_vectors(encoder, 5, filters={"modality": "CT"})[0]
        assert len(only_ct) == 1
    reindex(root, "PCA16,Flat")  # no selector support in FAISS: filters by over-fetching
    with open_current(root) as store:
        only_ct = store.search_image_vectors(encoder, 5, filters={"modality": "CT"})[0]
        assert len(only_ct) == 1 and store.get(only_ct[0].id)["modality"] == "CT"
    with pytest.raises(IndexSpecError, match="needs at least"):
        reindex(root, "ivfpq")
    with pytest.raises(IndexSpecError, match="cannot parse"):
        reindex(root, "NoSuchIndex")


def test_a_second_writer_is_refused(built, tmp_path):
    root = copy_root(built, tmp_path / "root")
    with layout.write_lock(root), pytest.raises(IndexLockedError, match="another index job"):
        reindex(root, "flat")


# -- crash safety and resume -----------------------------------------------------------------------


def staged_count(db: Path) -> int | None:
    if not db.is_file():
        return None
    try:
        with closing(sqlite3.connect(db, timeout=10)) as conn:
            return conn.execute("SELECT count(*) FROM embedded").fetchone()[0]
    except sqlite3.OperationalError:
        return None


def wait_for(condition, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            pytest.fail(f"build exited early: {child.communicate()[1].decode()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("build made no progress")
        time.sleep(0.002)


def test_kill_9_during_build_keeps_old_version_and_rerun_resumes_identically(
    built, archive, bundle_dir, medpix_images, tmp_path
):
    root = tmp_path / "root"
    first = tmp_path / "first"
    for image in medpix_images[60:62]:
        copy(image, first / image.name)
    build(root, bundle_dir, scan_folder(first), OPTIONS)
    old = open_current(root)
    db = layout.staging_dir(root, old.fingerprint) / STAGING_DB
    command = ["build", "--model", str(bundle_dir), "--images", str(archive), "--out", str(root)]
    command += JOB_ARGS
    child = subprocess.Popen(
        [sys.executable, "-m", "convirt.cli", "index", *command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: (staged_count(db) or 0) >= 8, child)  # two chunks committed
        with closing(sqlite3.connect(db, timeout=60, isolation_level=None)) as gate:
            gate.execute("BEGIN IMMEDIATE")  # the child now blocks at its next commit
            time.sleep(0.5)
            child.kill()
            child.wait(30)
            gate.execute("ROLLBACK")
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -9
    staged = staged_count(db)
    assert 8 <= staged < IMAGES_INDEXED
    assert layout.read_current(root) == "000001" and layout.list_versions(root) == ["000001"]
    assert not old.has_newer_version() and old.count == 2
    assert info(root)["unfinished_jobs"] == [old.fingerprint]
    assert cli.main(command) == 0  # the same build, run again
    report = report_of(root)["counts"]
    assert report["resumed"] == staged and report["embedded"] == IMAGES_INDEXED - staged
    assert old.has_newer_version() and info(root)["unfinished_jobs"] == []
    assert_same_index(snapshot(root), snapshot(built), exact=True)
    old.close()


# -- model mismatch, shards, verify, info ----------------------------------------------------------


def test_a_different_model_is_refused_with_both_fingerprints(
    built, archive, small_model_config, tmp_path, capsys
):
    other = make_bundle(small_model_config, 1, tmp_path / "other")
    theirs = load_bundle(other).fingerprint
    with open_current(built) as store:
        ours = store.fingerprint
    assert ours != theirs
    with pytest.raises(ModelMismatchError) as caught:
        open_current(built, expected_fingerprint=theirs)
    assert ours in str(caught.value) and theirs in str(caught.value)
    root = copy_root(built, tmp_path / "root")
    code = cli.main(["add", "--root", str(root), "--model", str(other), "--images", str(archive)])
    assert code == 1
    error = capsys.readouterr().err
    assert ours in error and theirs in error
    assert layout.list_versions(root) == ["000001"]


def test_sharded_build_and_merge_equal_a_single_build(
    built, archive, bundle_dir, medpix_images, tmp_path
):
    # the duplicate pair lands in different shards: merge must keep the copy a single build keeps
    primary = f"medpix/a/{medpix_images[0].name}"
    assert shard_of(primary, 2) != shard_of("other/same_as_first.jpg", 2)
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    build(shards[0], bundle_dir, scan_folder(archive), OPTIONS, shard=(0, 2))
    command = ["build", "--model", str(bundle_dir), "--images", str(archive), "--shard", "1/2"]
    assert cli.main([*command, "--out", str(shards[1]), *JOB_ARGS]) == 0
    counts = [info(s)["images"] for s in shards]
    assert all(counts) and sum(counts) >= IMAGES_INDEXED
    with pytest.raises(IndexStoreError, match="shard 0/2"):
        open_current(shards[0])
    with pytest.raises(IndexStoreError, match="missing"):
        merge(tmp_path / "merged", shards[:1])
    assert cli.main(["merge", "--out", str(tmp_path / "merged"), *map(str, shards)]) == 0
    assert_same_index(snapshot(tmp_path / "merged"), snapshot(built), exact=False)
    assert report_of(tmp_path / "merged")["duplicates"] == report_of(built)["duplicates"]


def test_verify_detects_a_removed_image_file(medpix_images, bundle_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    files = [copy(p, folder / p.name) for p in medpix_images[70:74]]
    build(tmp_path / "root", bundle_dir, scan_folder(folder), OPTIONS)
    assert verify(tmp_path / "root", hashes=True).ok
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:-10])
    result = verify(tmp_path / "root")
    assert len(result.problems) == 2
    assert str(files[1]) in result.problems[0] and "missing" in result.problems[0]
    assert str(files[2]) in result.problems[1] and "changed" in result.problems[1]
    assert cli.main(["verify", "--root", str(tmp_path / "root")]) == 1
    assert "image file missing" in capsys.readouterr().out


def test_info_reports_model_counts_type_sizes_and_time(built, embedder, capsys):
    assert cli.main(["info", "--root", str(built)]) == 0
    text = capsys.readouterr().out
    for expected in (
        embedder.bundle.fingerprint,
        f"{IMAGES_INDEXED}",
        "Flat",
        "meta.sqlite",
        "created_at",
    ):
        assert expected in text
    assert cli.main(["info", "--root", str(built), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"] == IMAGES_INDEXED and data["duplicates"] == 1 and data["skipped"] == 3
    assert data["factory"] == {"joint": "Flat", "encoder": "Flat"} and data["total_bytes"] > 0
    assert data["seconds"] > 0 and data["dims"] == {"joint": 512, "encoder": 1280}


def test_cli_explains_every_subcommand(capsys):
    for command in ("build", "add", "remove", "reindex", "merge", "info", "verify"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0
        assert "--root" in capsys.readouterr().out
    assert cli.main(["info", "--root", "/nonexistent/index"]) == 1
    assert "no index at /nonexistent/index" in capsys.readouterr().err


def test_a_build_decodes_only_what_the_image_cache_lacks(archive, bundle_dir, tmp_path):
    cache = tmp_path / "cache"
    options = replace(OPTIONS, cache_dir=cache)
    side = load_bundle(bundle_dir).config.resize
    # training or `convirt cache build` decoded the medpix images already, at the model's side
    medpix = [item for item in scan_folder(archive).items if "medpix" in item.relpath]
    list(Resolver(ImageCache(cache), side, workers=1, progress=False).resolve(medpix))
    before = ImageCache(cache).info()["sides"][side]["images"]
    first = build(tmp_path / "a", bundle_dir, scan_folder(archive), options)
    after = ImageCache(cache).info()["sides"][side]["images"]
    assert after - before == IMAGES_INDEXED - len(medpix)  # only the others were decoded
    second = build(tmp_path / "b", bundle_dir, scan_folder(archive), options)
    assert ImageCache(cache).info()["sides"][side]["images"] == after
    with open_current(tmp_path / "a") as a, open_current(tmp_path / "b") as b:
        assert np.array_equal(a.vectors["joint"], b.vectors["joint"])
    assert first.count == second.count == IMAGES_INDEXED


def test_adding_what_is_indexed_decodes_nothing_even_with_an_empty_cache(
    built, archive, bundle_dir, tmp_path
):
    root = copy_root(built, tmp_path / "root")
    cold = tmp_path / "empty-cache"
    summary = add(root, bundle_dir, scan_folder(archive), replace(OPTIONS, cache_dir=cold))
    assert summary.changes.get("embedded", 0) == 0
    assert ImageCache(cold).info()["sides"] == {}  # hashed, never decoded
