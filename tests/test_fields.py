"""Normalised fields (index/fields.py) on the four shared manifests, a card's case summary, an
image's report by sentence, and the facets a page offers.

The vocabulary is checked on every row of medpix, covid-cxr, covid-ct and roco; the rest on a
real index of 34 of their images (all four datasets, the rows that test the edges: MedPix's CT
"Drawing", a covid-cxr CT, "todo" findings and "?" views, ROCO captions naming no modality),
built with a small untrained bundle and served by a real `convirt serve`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import error_of, index_of_rows, read_rows, server_settings, serving
from serving import ServerProcess

from index.fields import BODY_PARTS, MODALITIES, derived_fields, outdated_note, with_derived
from index.read.facets import offered
from index.read.store import open_current
from index.write import rewrite, template

DATASETS = ("medpix", "covid-cxr", "covid-ct", "roco")
# the columns of the demo archive (scripts/prepare_archive.py), as the four datasets spell them
FIELDS = [
    "image", "text", "dataset", "split", "type", "modality", "modality_keyword", "plane",
    "location", "location_category", "diagnosis", "case_id", "finding", "view", "patient_id",
    "sex", "age", "licence",
]  # fmt: skip
# what a person calls each row's modality, by the dataset's own words
HUMAN_MODALITY = {
    "medpix": lambda r: {"CT": "CT", "MR": "MR"}[r["type"]],
    "covid-cxr": lambda r: {"CT": "CT", "X-ray": "XR"}[r["modality"]],
    "covid-ct": lambda r: "CT",
    "roco": lambda r: {
        "CT": "CT", "MRI": "MR", "X-ray": "XR", "ultrasound": "US", "angiography": "XA", "": None
    }[r["modality_keyword"]],
}  # fmt: skip
HUMAN_ROCO = ("CT", "MRI", "X-ray", "ultrasound", "angiography", "")  # ROCO rows picked, by keyword
NO_EFFUSION = "images/pneumocystis-pneumonia-2-PA.jpg"  # covid-cxr: "No pleural effusion."
SHOWN, HIDDEN = "split", "plane"  # CONVIRT_FACETS_SHOW / CONVIRT_FACETS_HIDE of the server


@pytest.fixture(scope="module")
def manifests(datasets) -> dict[str, list[dict[str, str]]]:
    return {name: read_rows(datasets / name / "manifest.csv") for name in DATASETS}


# -- the vocabulary on every row of the four manifests ---------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_every_row_gets_the_modality_a_person_would_name(datasets, manifests, name):
    source = str(datasets / name / "manifest.csv")
    for row in manifests[name]:
        found = derived_fields(row, source)
        assert found["modality"] == HUMAN_MODALITY[name](row), row["image"]
        own = (row.get("modality") or row.get("modality_keyword") or "").strip()
        assert found["modality_original"] == (own or None)  # the dataset's own text, kept


def test_medpix_drawings_and_virtual_colonoscopy_are_the_cts_they_are(manifests):
    odd = [r for r in manifests["medpix"] if r["modality"] in ("Drawing", "Virtual Colonoscopy")]
    assert len(odd) == 5
    for row in odd:
        assert derived_fields(row)["modality"] == row["type"]
        assert derived_fields(row)["modality_original"] == row["modality"]


@pytest.mark.parametrize("name", DATASETS)
def test_every_row_gets_a_body_part_where_something_says(datasets, manifests, name):
    source = str(datasets / name / "manifest.csv")
    parts = {derived_fields(row, source)["body_part"] for row in manifests[name]}
    if name == "roco":
        assert parts == {None}  # captions only: unknown, never "other"
    elif name.startswith("covid"):
        assert parts == {"chest"}  # chest datasets, by name
    else:
        assert parts <= set(BODY_PARTS) and len(parts) >= 6
        by_location = {r["location"]: derived_fields(r)["body_part"] for r in manifests[name]}
        assert by_location["Spine"] == "spine" and by_location["Brain and Neuro"] == "head"
        assert by_location["Chest, Pulmonary"] == "chest"


def test_deriving_again_changes_nothing(manifests):
    for name in DATASETS:
        for row in manifests[name][:300]:
            row = {**row, "dataset": name}
            modality, meta = with_derived(row)
            assert with_derived(meta) == (modality, meta)
            assert modality in (*MODALITIES, None)


# -- a real index of the four -----------------------------------------------------------------------


def pick(rows: list[dict], test, n: int) -> list[dict]:
    return [r for r in rows if test(r)][:n]


@pytest.fixture(scope="module")
def rows(datasets, manifests) -> list[dict[str, str]]:
    medpix, cxr, ct, roco = (manifests[n] for n in DATASETS)
    picked = {
        "medpix": pick(medpix, lambda r: r["modality"] == "Drawing", 2)
        + pick(medpix, lambda r: r["location"] in ("Spine", "Genitourinary"), 4)
        + pick(medpix, lambda r: r["type"] == "MR", 4),
        "covid-cxr": pick(cxr, lambda r: r["image"] == NO_EFFUSION, 1)
        + pick(cxr, lambda r: r["modality"] == "CT", 3)
        + pick(cxr, lambda r: r["finding"] == "todo", 2)
        + pick(cxr, lambda r: r["view"] == "?", 2),
        "covid-ct": ct[:4],
        "roco": [pick(roco, lambda r, k=k: r["modality_keyword"] == k, 2) for k in HUMAN_ROCO],
    }
    picked["roco"] = [r for group in picked["roco"] for r in group]
    out = []
    for name, chosen in picked.items():
        for row in chosen:
            licence = row.get("licence") or row.get("license") or ""
            out.append(
                {
                    **{k: v for k, v in row.items() if k in FIELDS},
                    "image": str(datasets / name / row["image"]),
                    "dataset": name,
                    "licence": licence.strip(),
                }
            )
    return out


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle_dir, rows) -> Path:
    return index_of_rows(tmp_path_factory.mktemp("fields"), bundle_dir, rows, FIELDS)


@pytest.fixture(scope="module")
def by_path(index_root) -> dict[str, dict]:
    with open_current(index_root) as store:
        return {row["path"]: row for row in store.get_many(store.ids.tolist()).values()}


@pytest.fixture(scope="module")
def server(bundle_dir, index_root) -> Iterator[ServerProcess]:
    settings = server_settings(
        bundle_dir, index_root, CONVIRT_FACETS_SHOW=SHOWN, CONVIRT_FACETS_HIDE=HIDDEN
    )
    with serving(settings) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def human(row: dict) -> str | None:
    name = row["dataset"]
    return HUMAN_MODALITY[name](row)


def every_result(client: httpx.Client, **controls) -> list[dict]:
    body = {"text": "chest", "k": 100, "group_by": "none", **controls}
    response = client.post("/v1/search/text", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_the_index_keeps_the_originals(rows, by_path):
    for row in rows:
        stored = by_path[row["image"]]
        assert stored["modality"] == human(row)
        own = (row.get("modality") or row.get("modality_keyword") or "").strip() or None
        assert stored["meta"].get("modality_original") == own
        if row["dataset"] == "medpix":
            assert stored["meta"]["body_part_original"] == row["location"]
            assert stored["meta"]["modality"] == row["modality"]  # the manifest's column, as is


def test_the_ct_filter_finds_every_ct_and_nothing_else(client, rows, by_path):
    cts = {by_path[r["image"]]["id"] for r in rows if human(r) == "CT"}
    assert {r["dataset"] for r in rows if human(r) == "CT"} == set(DATASETS)
    found = every_result(client, filters={"modality": "CT"})
    assert {int(r["id"]) for r in found} == cts
    both = every_result(client, filters={"modality": ["CT", "MR"]})
    assert len(both) == sum(human(r) in ("CT", "MR") for r in rows)
    chest = every_result(client, filters={"body_part": "chest"})
    assert {r["case"]["body_part"] for r in chest} == {"chest"}
    chests = {by_path[r["image"]]["id"] for r in rows if derived_fields(r)["body_part"] == "chest"}
    assert {int(r["id"]) for r in chest} == chests
    assert {r["dataset"] for r in rows if by_path[r["image"]]["id"] in chests} > {"covid-ct"}


def test_a_card_names_the_case_not_the_file(client, rows, by_path):
    results = {int(r["id"]): r for r in every_result(client)}
    for row in rows:
        case = results[by_path[row["image"]]["id"]]["case"]
        for value in case.values():
            assert value is None or not re.search(r"[\\/]|\.jpe?g|\.png|[0-9a-f]{32}", value)
        text = " ".join(row["text"].split())
        if row["dataset"] == "medpix":
            assert case["title"] == (row["diagnosis"].strip() or case["title"])
            assert case["age"] == row["age"] and case["sex"] == row["sex"]
            assert case["exam"] == f"{human(row)} · {case['body_part'].capitalize()}"
            assert case["source"] == "medpix"
        elif row["dataset"] == "covid-cxr":
            if row["finding"] == "todo":  # a placeholder is no title: the report's first words
                assert case["title"].rstrip("…") in text
            else:
                assert case["title"] == row["finding"]
            assert case["exam"] == ("CT · Chest" if human(row) == "CT" else "X-ray · Chest")
            assert case["licence"] == (row["licence"] or None)
        elif row["dataset"] == "roco":
            assert case["licence"] == row["licence"] and case["body_part"] is None
            assert case["title"].rstrip("…") in text  # its caption's first sentence


def test_the_report_endpoint_marks_what_is_absent(client, by_path, datasets):
    image = str(datasets / "covid-cxr" / NO_EFFUSION)
    image_id = by_path[image]["id"]
    body = client.get(f"/v1/images/{image_id}/report").json()
    assert body["id"] == str(image_id) and body["report"] == by_path[image]["report"]
    report = body["report"]
    for sentence in body["sentences"]:
        written = report[sentence["start"] : sentence["end"]]
        assert " ".join(written.split()).rstrip(".;,") == sentence["text"].rstrip(".")
    denying = [s for s in body["sentences"] if s["text"] == "No pleural effusion."]
    assert denying[0]["findings"] == [{"finding": "pleural effusion", "status": "absent"}]
    assert any(f["status"] == "present" for s in body["sentences"] for f in s["findings"])
    starts = [s["start"] for s in body["sentences"]]
    assert starts == sorted(starts)
    error_of(client.get("/v1/images/12345/report"), 404, "unknown_id")


def test_facets_offer_kinds_of_things_not_names_of_them(client, index_root):
    facets = {f["field"]: f for f in client.get("/v1/facets").json()["facets"]}
    values = {name: {v["value"] for v in f["values"]} for name, f in facets.items()}
    assert values["modality"] == {"CT", "MR", "XR", "US", "XA"}
    assert values["body_part"] <= set(BODY_PARTS) and "chest" in values["body_part"]
    for hidden in ("case_id", "patient_id", "licence", "modality_original", "body_part_original",
                   "modality_keyword", "type", "location", "diagnosis", HIDDEN):  # fmt: skip
        assert hidden not in facets
    assert "todo" not in values["finding"] and "?" not in values["view"]
    assert SHOWN in facets  # CONVIRT_FACETS_SHOW reveals what the rule hides
    with open_current(index_root) as store:  # the rule alone, without the settings
        listed = {f.field for f in store.facets() if offered(f)}
    assert {"modality", "body_part", "dataset", "sex", "age", "plane"} <= listed
    assert not listed & {"split", "case_id", "licence", "modality_original", "relpath"}


# -- a version written before the vocabulary ------------------------------------------------------


def test_reindex_brings_an_older_version_up_to_date(tmp_path, bundle_dir, rows, monkeypatch):
    few = [r for r in rows if r["dataset"] == "medpix"][:5]
    few += [r for r in rows if r["dataset"] == "roco"][:3]
    with monkeypatch.context() as before:  # publish as versions did before index/fields.py
        before.setattr(template.rows, "derive_fields", lambda conn: 0)
        before.setattr(template, "FIELDS_VERSION", None)
        root = index_of_rows(tmp_path, bundle_dir, few, FIELDS)
    with open_current(root) as store:
        old = store.get_many(store.ids.tolist())
        assert "convirt index reindex" in outdated_note(store.info, root)
        assert "Drawing" in {row["modality"] for row in old.values()}  # the archive's spelling
        index_type = store.info["index_type"]
    print(rewrite.reindex(root).line())  # no --index-type: the current one
    with open_current(root) as store:
        new = store.get_many(store.ids.tolist())
        assert outdated_note(store.info, root) is None and store.info["index_type"] == index_type
    by_image = {r["image"]: r for r in few}
    for image_id, row in old.items():
        assert new[image_id]["modality"] == human(by_image[row["path"]])
        own = row["modality"] or row["meta"].get("modality_keyword") or None
        assert new[image_id]["meta"].get("modality_original") == own
