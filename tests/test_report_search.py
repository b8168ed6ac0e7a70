"""The archive's reports in the ranking: the sentence space of a version (build, add, remove,
merge), hybrid text search on a real server, and what similar cases said.

Real images and reports from the shared datasets (covid-cxr notes, medpix and roco captions),
chosen so that some reports assert a pneumothorax or an effusion and others deny one, and two
images have no report at all. The model is untrained: what these tests check is what the
reports' evidence does to the ranking, which does not depend on training.
"""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import INDEX_OPTIONS, built_root, error_of, server_settings, serving, write_csv

from convirt.bundle import load_bundle
from convirt.findings import term_status
from convirt.inference import Embedder
from convirt.sentences import split_sentences
from index.read.hybrid import WEIGHTS
from index.read.store import open_current
from index.sources.manifest import read_manifest
from index.write.build import add, build
from index.write.merge import merge
from index.write.rewrite import remove

FIELDS = ["image", "text", "dataset", "case_id"]


def statuses(report: str, term: str) -> set[str]:
    found = {term_status(s, term) for s in split_sentences(report)}
    return found - {None}


def asserts(report: str, term: str) -> bool:
    return "present" in statuses(report, term)


def denies(report: str, term: str) -> bool:
    found = statuses(report, term)
    return "absent" in found and "present" not in found


def only_asserts(report: str, term: str) -> bool:
    found = statuses(report, term)
    return "present" in found and "absent" not in found


@pytest.fixture(scope="module")
def rows(datasets) -> list[dict[str, str]]:
    """Reports that assert and deny a pneumothorax and an effusion, others, and two images
    without a report."""
    picked: dict[str, dict[str, str]] = {}

    def take(dataset: str, keep, n: int) -> None:
        with open(datasets / dataset / "manifest.csv", newline="", encoding="utf-8") as f:
            source = list(csv.DictReader(f))
        found = [r for r in source if keep(r["text"])][:n]
        for r in found:
            image = os.path.normpath(datasets / dataset / r["image"])
            case = r.get("case_id") or r.get("patient_id") or r.get("pmc_article") or ""
            picked.setdefault(
                image, {"image": image, "text": r["text"], "dataset": dataset, "case_id": case}
            )

    for dataset in ("covid-cxr", "roco", "medpix"):
        take(dataset, lambda t: asserts(t, "pneumothorax"), 3)
        take(dataset, lambda t: denies(t, "pneumothorax"), 3)
        take(dataset, lambda t: asserts(t, "effusion"), 2)
        take(dataset, lambda t: denies(t, "effusion"), 2)
    take("medpix", lambda t: bool(t.strip()), 6)
    take("covid-cxr", lambda t: not t.strip(), 2)
    return list(picked.values())


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, rows) -> Path:
    return write_csv(tmp_path_factory.mktemp("reports") / "manifest.csv", rows, FIELDS)


@pytest.fixture(scope="module")
def root(tmp_path_factory, bundle_dir, manifest) -> Path:
    return built_root(tmp_path_factory.mktemp("report-index"), bundle_dir, read_manifest(manifest))


@pytest.fixture(scope="module")
def embedder(bundle_dir) -> Embedder:
    return Embedder(load_bundle(bundle_dir))


def sentence_rows(root: Path) -> dict[str, set[int]]:
    """sentence text -> ids of the images whose report holds it, as the current version stores it."""
    store = open_current(root)
    with closing(store):
        links: dict[str, set[int]] = {}
        for sid, text in enumerate(store.sentences.texts):
            links[text] = set(store.sentences.images_of(sid).tolist())
        return links


def expected_rows(store) -> dict[str, set[int]]:
    links: dict[str, set[int]] = {}
    for image_id, row in store.get_many(store.ids.tolist()).items():
        for sentence in split_sentences(row["report"]):
            links.setdefault(sentence, set()).add(image_id)
    return links


# -- the sentence space ----------------------------------------------------------------------------


def test_build_embeds_every_distinct_sentence_once(root, embedder):
    with closing(open_current(root)) as store:
        assert sentence_rows(root) == expected_rows(store)
        space = store.sentences
        assert store.info["sentences"] == {"count": len(space), "embedded": len(space), "reused": 0}
        np.testing.assert_allclose(
            space.vectors, embedder.embed_texts(space.texts).vectors, atol=1e-5
        )
        no_report = [i for i, r in store.get_many(store.ids.tolist()).items() if not r["report"]]
        assert len(no_report) == 2 and not np.isin(no_report, space.reported).any()
        findings = {tuple(f) for sid in range(len(space)) for f in space.findings_of(sid)}
        assert ("pneumothorax", "present") in findings and ("pneumothorax", "absent") in findings


def test_remove_and_add_keep_the_sentences_of_the_images_indexed(
    root, tmp_path, bundle_dir, manifest, rows
):
    copy = tmp_path / "root"
    build(copy, bundle_dir, read_manifest(manifest), INDEX_OPTIONS)
    before = sentence_rows(copy)
    lonely = next(text for text, ids in before.items() if len(ids) == 1)
    (doomed,) = before[lonely]
    remove(copy, ids=[doomed])
    after = sentence_rows(copy)
    assert lonely not in after
    assert after == {t: ids - {doomed} for t, ids in before.items() if ids - {doomed}}
    with closing(open_current(copy)) as store:
        assert store.info["sentences"]["embedded"] == 0  # every vector copied from the parent
    # add it back: only its own sentences are embedded again
    one = tmp_path / "one.csv"
    row = next(r for r in rows if lonely in split_sentences(r["text"]))
    with open(one, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerow(row)
    add(copy, bundle_dir, read_manifest(one), INDEX_OPTIONS)
    assert sentence_rows(copy) == before
    with closing(open_current(copy)) as store:
        missing = {s for s in split_sentences(row["text"]) if s not in after}
        # its sentences are gone from the served space but their vectors are still in the segment
        # that held it (a removal deletes no file), so none is embedded again
        assert missing and store.info["sentences"]["embedded"] == 0


def test_merged_shards_hold_the_sentences_of_a_single_build(root, tmp_path, bundle_dir, manifest):
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    for n, shard in enumerate(shards):
        build(shard, bundle_dir, read_manifest(manifest), INDEX_OPTIONS, shard=(n, 2))
    merged = tmp_path / "merged"
    merge(merged, shards)
    assert sentence_rows(merged) == sentence_rows(root)
    with closing(open_current(merged)) as a, closing(open_current(root)) as b:
        assert a.info["sentences"]["embedded"] == 0
        order = {t: i for i, t in enumerate(b.sentences.texts)}
        rows_b = [order[t] for t in a.sentences.texts]
        np.testing.assert_allclose(a.sentences.vectors, b.sentences.vectors[rows_b], atol=1e-6)


def test_a_version_without_sentences_still_serves_text_queries(root, tmp_path, embedder):
    """Versions written before report sentences: text queries rank by the image alone."""
    old = tmp_path / "old"
    shutil.copytree(root, old)
    version = old / "versions" / "000001"
    (version / "sentences.npy").unlink()
    with closing(sqlite3.connect(version / "meta.sqlite")) as conn:
        conn.executescript(
            "DROP TABLE sentences; DROP TABLE sentence_images; DROP TABLE report_terms;"
        )
    info = (version / "version.json").read_text().replace('"sentences": {', '"sentences_was": {')
    (version / "version.json").write_text(info)
    with closing(open_current(old)) as store:
        vector = embedder.embed_texts(["pneumothorax"]).vectors[0]
        assert store.sentences is None
        assert store.rank_text(vector, "pneumothorax", 5) is None
        assert len(store.search("joint", vector, 5)) == 5


# -- hybrid search on a real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(root, bundle_dir):
    with (
        serving(server_settings(bundle_dir, root)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        yield http


def search(client, text: str, **extra) -> dict:
    body = {"text": text, "k": 100, "group_by": "none", **extra}
    response = client.post("/v1/search/text", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_negated_report_never_satisfies_must(client, rows):
    answer = search(client, "chest radiograph", must=["effusion"])
    reports = [r["report"] or "" for r in answer["results"]]
    assert reports and all(asserts(report, "effusion") for report in reports)
    denying = [r for r in rows if denies(r["text"], "effusion")]
    assert denying, "the index holds reports that deny an effusion"
    excluded = search(client, "chest radiograph", must_not=["effusion"])["results"]
    kept = {r["report"] for r in excluded}
    assert all(r["text"] in kept for r in denying)  # denying is not asserting
    assert not any(asserts(report or "", "effusion") for report in kept)


def test_no_pneumothorax_ranks_reports_denying_it_above_those_asserting_it(client):
    answer = search(client, "No pneumothorax.")
    assert answer["mode"] == "hybrid"
    ranks = {n: r["report"] or "" for n, r in enumerate(answer["results"])}
    denying = [n for n, report in ranks.items() if denies(report, "pneumothorax")]
    asserting = [n for n, report in ranks.items() if only_asserts(report, "pneumothorax")]
    assert len(denying) >= 3 and len(asserting) >= 3
    assert max(denying) < min(asserting), (denying, asserting)
    top = answer["results"][0]["evidence"]
    assert "pneumothorax" in top["terms"]
    # and the other way round
    answer = search(client, "Pneumothorax.")
    ranks = {n: r["report"] or "" for n, r in enumerate(answer["results"])}
    denying = [n for n, report in ranks.items() if denies(report, "pneumothorax")]
    asserting = [n for n, report in ranks.items() if only_asserts(report, "pneumothorax")]
    assert max(asserting) < min(denying), (asserting, denying)
    assert "pneumothorax" in answer["results"][0]["evidence"]["sentence"].lower()


def test_images_without_a_report_still_rank_and_modes_differ(client, root):
    with closing(open_current(root)) as store:
        count = store.count
    answer = search(client, "Bilateral opacities.")
    assert len(answer["results"]) == count  # hybrid reads every image's image score
    silent = [r for r in answer["results"] if not r["report"]]
    assert len(silent) == 2 and all(r["evidence"]["has_report"] is False for r in silent)
    stand_in = WEIGHTS.image + WEIGHTS.sentence  # the image stands in for the report's sentences
    assert all(
        r["score"] == pytest.approx(stand_in * r["evidence"]["image"], abs=1e-4) for r in silent
    )
    report_only = search(client, "Bilateral opacities.", mode="report")
    assert report_only["mode"] == "report"
    assert all(r["report"] for r in report_only["results"])
    image_only = search(client, "Bilateral opacities.", mode="image")
    assert image_only["mode"] == "image" and all(
        r["evidence"] is None for r in image_only["results"]
    )
    # words no report holds, a query of stop words only: the image ranks alone, no error
    for text in ("Zqxw vbnm.", "of the and", "no"):
        assert len(search(client, text)["results"]) == count
        assert all(r["report"] for r in search(client, text, mode="report")["results"])
    rrf = search(client, "Bilateral opacities.", fusion="rrf")
    assert {r["id"] for r in rrf["results"]} == {r["id"] for r in answer["results"]}
    error_of(client.post("/v1/search/text", json={"text": "x", "mode": "words"}), 422)


def test_suggest_reads_the_reports_of_similar_cases(client, root, datasets):
    with closing(open_current(root)) as store:
        rows = store.get_many(store.ids.tolist())
    image_id, row = next((i, r) for i, r in rows.items() if r["meta"].get("dataset") == "medpix")
    case = row["meta"]["case_id"]
    same_case = {i for i, r in rows.items() if r["meta"].get("case_id") == case}
    answer = client.post("/v1/reports/suggest", data={"image_id": str(image_id), "count": "4"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "not a diagnosis" in body["disclaimer"]
    assert 1 <= len(body["sentences"]) <= 4
    assert len({s["text"] for s in body["sentences"]}) == len(body["sentences"])
    cases = {int(c["id"]) for c in body["cases"]}
    assert cases and not cases & same_case  # its own study is never a "similar case"
    held = {s for i in cases for s in split_sentences(rows[i]["report"])}
    assert any(s["text"] in held and s["cases"] for s in body["sentences"])
    present = {
        f["finding"] for s in body["sentences"] for f in s["findings"] if f["status"] == "present"
    }
    assert set(body["draft"]) == present
    upload = Path(row["path"]).read_bytes()
    answer = client.post("/v1/reports/suggest", files={"file": ("x.jpg", upload, "image/jpeg")})
    assert answer.status_code == 200 and answer.json()["sentences"]
    error_of(client.post("/v1/reports/suggest", data={"count": "3"}), 422)
    error_of(client.post("/v1/reports/suggest", data={"image_id": "12345"}), 404)
