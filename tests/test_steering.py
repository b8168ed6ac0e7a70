"""Steering a search, through the API of a real server and through its page in real Chromium:
one card per study, filters and facets, keywords, a threshold, refine by example, a region, and
the heat-map that shows why an image matched.

The index holds 46 real images: medpix cases (several images each, with case_id, age and sex)
and covid-cxr X-rays (with patient_id), built with a small untrained bundle.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import browser_page, error_of, index_of_rows, server_settings, serving
from PIL import Image
from serving import ServerProcess

from convirt.bundle import load_bundle
from convirt.inference import Embedder
from index.read.store import open_current
from index.write.build import Options
from service.search.feedback import rocchio

FIELDS = ["image", "text", "dataset", "modality", "view", "case_id", "patient_id", "age", "sex"]
OPTIONS = Options(batch_size=8, chunk_batches=1, workers=2, progress=False)
QUERY = "Axial CT image of the chest showing a mass in the lung."


# -- fixtures --------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def rows(datasets) -> list[dict[str, str]]:
    medpix = [r for r in read_csv(datasets / "medpix" / "manifest.csv") if r["split"] == "train"]
    covid = [r for r in read_csv(datasets / "covid-cxr" / "manifest.csv") if r["split"] == "train"]
    picked = [
        {
            "image": str(datasets / "medpix" / r["image"]),
            "text": r["text"],
            "dataset": "medpix",
            "modality": r["modality"],
            "case_id": r["case_id"],
            "age": r["age"],
            "sex": r["sex"],
        }
        for r in medpix[:36]
    ] + [
        {
            "image": str(datasets / "covid-cxr" / r["image"]),
            "text": r["text"],
            "dataset": "covid-cxr",
            "modality": r["modality"],
            "view": r["view"],
            "patient_id": r["patient_id"],
            "age": r["age"],
            "sex": r["sex"],
        }
        for r in covid[:10]
    ]
    cases = [r["case_id"] for r in picked if r.get("case_id")]
    assert len(set(cases)) < len(cases), "the fixture needs cases with several images"
    return picked


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle_dir, rows) -> Path:
    return index_of_rows(tmp_path_factory.mktemp("steering"), bundle_dir, rows, FIELDS)


@pytest.fixture(scope="module")
def server(bundle_dir, index_root) -> Iterator[ServerProcess]:
    with serving(server_settings(bundle_dir, index_root)) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def by_id(index_root) -> dict[int, dict]:
    with open_current(index_root) as store:
        return store.get_many(store.ids.tolist())


def search(client: httpx.Client, text: str = QUERY, **controls) -> list[dict]:
    response = client.post("/v1/search/text", json={"text": text, **controls})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def ids(results: list[dict]) -> list[int]:
    return [int(r["id"]) for r in results]


def case_of(result: dict) -> str | None:
    return result["metadata"]["fields"].get("case_id") or None


# -- one card per study ----------------------------------------------------------------------------


def test_grouping_gives_one_card_per_case_led_by_its_best_image(client, rows):
    every = search(client, k=100, group_by="none")
    assert len(every) == len(rows)
    cards = search(client, k=6, group_by="study")
    assert len(cards) == 6
    keys = [case_of(card) or f"image {card['id']}" for card in cards]
    assert len(set(keys)) == 6
    # the leads are the first image of each case in the ungrouped ranking, in that order
    first_of: dict[str, dict] = {}
    for result in every:
        first_of.setdefault(case_of(result) or f"image {result['id']}", result)
    expected = sorted(first_of.values(), key=lambda r: -r["score"])[:6]
    assert ids(cards) == ids(expected)
    for card in cards:
        members = [r for r in every if case_of(r) and case_of(r) == case_of(card)]
        if len(members) > 1:
            assert card["group"]["field"] == "case_id" and card["group"]["key"] == case_of(card)
            assert card["group"]["size"] == len(members)
            assert {m["id"] for m in card["group"]["more"]} == {m["id"] for m in members[1:]}
        else:
            assert card["group"] is None or card["group"]["size"] == 1
    assert any(card["group"] and card["group"]["size"] > 1 for card in search(client, k=20))


def test_grouping_by_patient_uses_patient_id(client, rows):
    cards = search(client, k=100, group_by="patient")
    patients = [c["metadata"]["fields"].get("patient_id") for c in cards]
    named = [p for p in patients if p]
    assert (
        len(named) == len(set(named)) == len({r["patient_id"] for r in rows if r.get("patient_id")})
    )


# -- filters, facets, keywords, threshold ----------------------------------------------------------


def test_facets_list_the_values_and_ranges_in_the_index(client, rows):
    body = client.get("/v1/facets").json()
    facets = {f["field"]: f for f in body["facets"]}
    assert body["images"] == len(rows)
    datasets = {v["value"]: v["count"] for v in facets["dataset"]["values"]}
    assert datasets == {d: sum(r["dataset"] == d for r in rows) for d in ("medpix", "covid-cxr")}
    ages = [float(r["age"]) for r in rows if r.get("age", "").strip()]
    assert facets["age"]["kind"] == "range"
    assert (facets["age"]["low"], facets["age"]["high"]) == (min(ages), max(ages))


def test_filters_any_of_and_range(client, rows, by_id):
    covid = search(client, k=100, group_by="none", filters={"dataset": ["covid-cxr"]})
    assert len(covid) == sum(r["dataset"] == "covid-cxr" for r in rows)
    band = {"gte": 40, "lte": 60}
    aged = search(client, k=100, group_by="none", filters={"age": band})
    expected = [r for r in rows if r.get("age", "").strip() and 40 <= float(r["age"]) <= 60]
    assert 0 < len(aged) == len(expected)
    assert all(40 <= float(by_id[i]["meta"]["age"]) <= 60 for i in ids(aged))
    bad = client.post("/v1/search/text", json={"text": QUERY, "filters": {"age": {"from": 3}}})
    assert error_of(bad, 422)["code"] in ("invalid_filters", "invalid_request")
    unknown = client.post("/v1/search/text", json={"text": QUERY, "filters": {"colour": "red"}})
    assert error_of(unknown, 422)["code"] == "invalid_filters"


def test_keywords_filter_the_ranking(client, rows):
    word = "mass"
    having = {r["image"] for r in rows if re.search(rf"\b{word}(es)?\b", r["text"], re.I)}
    assert 0 < len(having) < len(rows)
    found = search(client, k=100, group_by="none", must=[word])
    assert all(re.search(word, r["report"] or "", re.I) for r in found)
    assert len(found) >= len(having)
    without = search(client, k=100, group_by="none", must_not=[word])
    assert not {r["id"] for r in found} & {r["id"] for r in without}
    assert len(found) + len(without) == len(rows)
    syntax = search(client, k=5, must=['"NEAR(mass*'])  # user text is never FTS syntax
    assert syntax == []


def test_min_score_keeps_only_results_at_or_above_it(client):
    every = search(client, k=100, group_by="none")
    cut = float(np.median([r["score"] for r in every]))
    kept = search(client, k=100, group_by="none", min_score=cut)
    assert ids(kept) == [int(r["id"]) for r in every if r["score"] >= cut]
    assert 0 < len(kept) < len(every)


# -- refine by example -----------------------------------------------------------------------------


def test_refine_moves_the_query_toward_a_liked_image(client, bundle_dir, index_root):
    every = search(client, k=100, group_by="none")
    liked, disliked = every[8], every[0]
    response = client.post(
        "/v1/search/refine",
        json={
            "text": QUERY,
            "liked": [liked["id"]],
            "disliked": [disliked["id"]],
            "k": 100,
            "group_by": "none",
        },
    )
    assert response.status_code == 200, response.text
    refined = ids(response.json()["results"])
    assert int(disliked["id"]) not in refined
    assert refined.index(int(liked["id"])) < 8
    # the same vector arithmetic in process gives the same ranking
    embedder = Embedder(load_bundle(bundle_dir))
    with open_current(index_root) as store:
        vector = rocchio(
            embedder.embed_texts([QUERY]).vectors[0],
            store.vectors_of([int(liked["id"])], "joint"),
            store.vectors_of([int(disliked["id"])], "joint"),
        )
        hits = store.search("joint", vector, 100, exclude={int(disliked["id"])})
    assert refined[:10] == [h.id for h in hits][:10]


def test_refine_refuses_what_it_cannot_use(client):
    assert error_of(client.post("/v1/search/refine", json={}), 422)["code"] == "nothing_to_refine"
    unknown = client.post("/v1/search/refine", json={"text": QUERY, "liked": ["12345"]})
    assert error_of(unknown, 404)["code"] == "unknown_id"
    assert error_of(client.post("/v1/search/refine", json={"liked": ["x1"]}), 422)["code"]


# -- a region --------------------------------------------------------------------------------------


def upload(client, path: str, box: str | None = None, k: int = 10) -> httpx.Response:
    data = {"k": str(k), "group_by": "none", **({"box": box} if box else {})}
    with open(path, "rb") as f:
        return client.post("/v1/search/image", files={"file": ("x.jpg", f.read())}, data=data)


def test_a_box_searches_by_that_region(client, rows, by_id):
    path = rows[3]["image"]
    whole = upload(client, path)
    assert ids(upload(client, path, "0,0,1,1").json()["results"]) == ids(whole.json()["results"])
    corner = upload(client, path, "0,0,0.5,0.5")
    assert corner.status_code == 200
    assert corner.json()["results"][0]["score"] < whole.json()["results"][0]["score"]
    image_id = next(i for i, row in by_id.items() if row["path"] == path)
    region = client.get(
        f"/v1/images/{image_id}/similar", params={"box": "0,0,0.5,0.5", "k": 10, "group_by": "none"}
    )
    assert ids(region.json()["results"]) == ids(corner.json()["results"])
    assert error_of(upload(client, path, "0.5,0.5,0.2,0.9"), 422)["code"] == "invalid_box"
    assert error_of(upload(client, path, "0,0,0.01,0.01"), 422)["code"] == "invalid_box"
    assert error_of(upload(client, path, "a,b"), 422)["code"] == "invalid_box"


# -- why it matched --------------------------------------------------------------------------------


def test_explain_returns_a_heat_map_that_depends_on_the_query(client, bundle_dir, by_id):
    image_id = next(iter(by_id))
    first = client.get("/v1/explain", params={"image_id": image_id, "text": QUERY})
    assert first.status_code == 200, first.text
    body = first.json()
    grid = np.array(body["grid"])
    assert grid.ndim == 2 and grid.shape[0] >= 4 and grid.std() > 0
    crop = body["crop"]
    # the encoder sees a centre square: the shorter side, less what the crop trims of the resize
    width, height = Image.open(by_id[image_id]["path"]).size
    config = load_bundle(bundle_dir).config
    side = min(width, height) * config.image_size / config.resize
    assert crop["width"] == pytest.approx(side / width, abs=0.01)
    assert crop["height"] == pytest.approx(side / height, abs=0.01)
    assert crop["left"] == pytest.approx((1 - crop["width"]) / 2, abs=0.01)
    other = client.get(
        "/v1/explain", params={"image_id": image_id, "text": "Frontal chest radiograph."}
    )
    assert not np.allclose(np.array(other.json()["grid"]), grid)
    another_image = list(by_id)[5]
    by_image = client.get("/v1/explain", params={"image_id": image_id, "query_id": another_image})
    assert by_image.json()["space"] == "encoder"
    assert by_image.json()["index_version"] == client.get("/readyz").json()["index_version"]
    assert error_of(client.get("/v1/explain", params={"image_id": 1, "text": "x"}), 404)["code"]
    unknown_query = {"image_id": image_id, "query_id": 1}
    assert error_of(client.get("/v1/explain", params=unknown_query), 404)["code"] == "unknown_id"
    both = client.get("/v1/explain", params={"image_id": image_id, "text": "x", "query_id": 1})
    assert error_of(both, 422)["code"] == "invalid_query"


# -- the page, in real Chromium --------------------------------------------------------------------


def card_ids(page) -> list[int]:
    return [
        int(i) for i in page.locator("#grid .card").evaluate_all("cs => cs.map(c => c.dataset.id)")
    ]


def test_page_groups_filters_thresholds_refines_boxes_explains_and_shares(client, server):
    with browser_page() as (browser, page, expect):
        page.goto(server.url + "/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        cards = page.locator("#grid .card")

        # grouping: the same cards as the API's grouped search, a "+N more" on a multi-image case
        page.fill("#query", QUERY)
        page.fill("#k", "8")
        page.click("#search-button")
        expect(cards).to_have_count(8)
        assert card_ids(page) == ids(search(client, k=8))
        page.fill("#k", "20")
        page.click("#search-button")
        expect(page.locator("#grid .more:not([hidden])").first).to_contain_text("more")

        # one filter, from the facets
        page.select_option("select[data-field='dataset']", "covid-cxr")
        expect(page.locator("#results-meta")).to_contain_text("cards")
        page.wait_for_function("document.body.getAttribute('aria-busy') === 'false'")
        expected = ids(search(client, k=20, filters={"dataset": "covid-cxr"}))
        expect(cards).to_have_count(len(expected))
        assert card_ids(page) == expected
        page.select_option("select[data-field='dataset']", "")
        page.wait_for_function("document.body.getAttribute('aria-busy') === 'false'")

        # a threshold
        scores = [r["score"] for r in search(client, k=20)]
        cut = round(float(np.median(scores)), 2)
        page.fill("#min-score", str(cut))
        page.press("#min-score", "Tab")  # leaving the field commits it
        expected = ids(search(client, k=20, min_score=cut))
        expect(cards).to_have_count(len(expected))
        shown = [float(s) for s in page.locator("#grid .score").all_inner_texts()]
        assert all(s >= cut - 0.0005 for s in shown)
        page.fill("#min-score", "")
        page.press("#min-score", "Tab")  # leaving the field commits it
        expect(cards).to_have_count(20)

        # refine with one Like
        liked = card_ids(page)[5]
        page.locator(f"#grid .card[data-id='{liked}'] .like").click()
        expect(page.locator("#refine-button")).to_contain_text("1 liked")
        page.click("#refine-button")
        expect(page.locator("#results-title")).to_contain_text("refined")
        refined = client.post(
            "/v1/search/refine", json={"text": QUERY, "liked": [str(liked)], "k": 20}
        )
        assert card_ids(page) == ids(refined.json()["results"])

        # a shared URL reloads the same results
        page.fill("#must-not", "pericardial")
        page.press("#must-not", "Tab")
        page.wait_for_function("document.body.getAttribute('aria-busy') === 'false'")
        expect(page).to_have_url(re.compile(r"not=pericardial"))
        before = card_ids(page)
        other = browser.new_page()
        other.goto(page.url)
        expect(other.locator("body")).to_have_attribute("data-ready", "true")
        expect(other.locator("#grid .card")).to_have_count(len(before))
        assert card_ids(other) == before
        assert other.input_value("#must-not") == "pericardial"
        other.close()

        # the heat-map, drawn over the image in the viewer
        first = cards.first
        first.locator(".why").click()
        viewer = page.locator("#viewer")
        expect(viewer).to_have_attribute("data-heat", "drawn", timeout=30_000)
        painted = page.locator("#viewer-overlay").evaluate(
            "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
            ".filter((v, i) => i % 4 === 3 && v > 0).length"
        )
        assert painted > 0
        page.keyboard.press("Escape")
        expect(viewer).not_to_be_visible()

        # a box drawn on a result, in the viewer
        target = card_ids(page)[0]
        first.locator(".region").click()
        expect(viewer).to_have_attribute("data-loaded", "true")
        stage = page.locator("#viewer-stage").bounding_box()
        x, y, width, height = (
            float(v) for v in page.get_attribute("#viewer-stage", "data-rect").split(",")
        )
        page.mouse.move(stage["x"] + x + width * 0.1, stage["y"] + y + height * 0.2)
        page.mouse.down()
        page.mouse.move(stage["x"] + x + width * 0.6, stage["y"] + y + height * 0.7, steps=5)
        page.mouse.up()
        page.click("#viewer-region-search")
        expect(page.locator("#results-title")).to_contain_text("(region)")
        drawn = re.search(r"box=([\d.%C,]+)", page.url).group(1).replace("%2C", ",")
        box_drawn = [float(v) for v in drawn.split(",")]
        assert box_drawn == pytest.approx([0.1, 0.2, 0.6, 0.7], abs=0.03)
        region = client.get(
            f"/v1/images/{target}/similar",
            params={"box": drawn, "k": 20, "must_not": ["pericardial"]},
        )
        assert card_ids(page) == ids(region.json()["results"])


def test_page_names_each_figures_licence_and_source_article(datasets, bundle_dir, tmp_path):
    roco = [r for r in read_csv(datasets / "roco" / "manifest.csv") if r["split"] == "dev"][:4]
    rows = [
        {
            "image": str(datasets / "roco" / r["image"]),
            "text": r["text"],
            "licence": r["licence"],
            "pmc_article": r["pmc_article"],
        }
        for r in roco
    ]
    rows.append(
        {
            "image": str(
                datasets / "medpix" / read_csv(datasets / "medpix" / "manifest.csv")[0]["image"]
            ),
            "text": "No licence here.",
        }
    )
    fields = ["image", "text", "licence", "pmc_article"]
    root = index_of_rows(tmp_path, bundle_dir, rows, fields)
    settings = server_settings(bundle_dir, root)
    with serving(settings) as server, browser_page() as (_browser, page, expect):
        found = httpx.post(
            f"{server.url}/v1/search/text", json={"text": "radiograph", "k": 10, "group_by": "none"}
        )
        names = {r["id"]: r["metadata"]["relpath"] for r in found.json()["results"]}
        page.goto(f"{server.url}/?q=radiograph&k=10&group=none")
        cards = page.locator("#grid .card")
        expect(cards).to_have_count(len(rows))
        panel = page.locator("#report-panel")
        shown = {}
        for n in range(len(rows)):
            card = cards.nth(n)
            card.locator(".open-report").click()  # licence and source: in the report panel
            expect(panel).to_have_attribute("data-id", card.get_attribute("data-id"))
            expect(panel).to_have_attribute("data-loaded", "true")
            line = panel.locator("#report-attribution")
            licence = line.locator(".licence")
            source = line.locator(".source")
            shown[names[card.get_attribute("data-id")]] = (
                licence.is_visible() and licence.inner_text(),
                source.is_visible() and source.get_attribute("href"),
            )
            assert not card.locator(".licence").count()  # never on the card itself
    expected = {
        Path(r["image"]).name: (
            f"Licence: {r['licence']}",
            f"https://www.ncbi.nlm.nih.gov/pmc/articles/{r['pmc_article']}/",
        )
        for r in rows[:-1]
    }
    expected[Path(rows[-1]["image"]).name] = (False, False)
    assert {Path(relpath).name: value for relpath, value in shown.items()} == expected
