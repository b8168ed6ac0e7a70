"""The search page as a radiologist walks it, in real Chromium against a real server: a text query,
the report panel with the matched sentence highlighted, the viewer (window/level, heat-map, keys),
Like/Not and Refine kept through a control change and a copied link, then a DICOM upload searched
by a drawn region, refined and explained with the upload as the query. And what the page never
shows by default: filesystem paths, hashes, `split`.

The index holds 46 real images (medpix cases with their reports and diagnoses, covid-cxr X-rays
with a licence column), every manifest column kept, built with a small untrained bundle.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import pydicom
import pytest
from conftest import (
    browser_page,
    calibrated_scales,
    index_of_rows,
    read_rows,
    server_settings,
    serving,
)
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from serving import ServerProcess

QUERY = "No hemorrhage noted."
K = 12
# the CT's own window in Hounsfield units, which the viewer must open with and show in HU
WINDOW_CENTER, WINDOW_WIDTH = 476, 2400
PATCH_HU = 500  # a uniform square at the centre of each DICOM, in what its values stand for
# a window typed over it: 400..800, so the patch is a quarter of the way up (grey 64); MONOCHROME1
# (white is low) shows it three quarters (grey 191)
TYPED_CENTER, TYPED_WIDTH = 600, 400


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(datasets) -> list[dict[str, str]]:
    """Manifest rows as they are (split, licence, case ids included), image paths absolute."""
    medpix = [r for r in read_rows(datasets / "medpix" / "manifest.csv") if r["split"] == "train"]
    covid = [r for r in read_rows(datasets / "covid-cxr" / "manifest.csv") if r["split"] == "train"]
    return [
        {**r, "image": str(datasets / "medpix" / r["image"]), "dataset": "medpix"}
        for r in medpix[:36]
    ] + [
        {**r, "image": str(datasets / "covid-cxr" / r["image"]), "dataset": "covid-cxr"}
        for r in covid[:10]
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle_dir, rows) -> Iterator[ServerProcess]:
    fields = list(dict.fromkeys(name for row in rows for name in row))
    root = index_of_rows(tmp_path_factory.mktemp("page"), bundle_dir, rows, fields)
    with serving(server_settings(bundle_dir, root)) as process:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            assert calibrated_scales(client), "the score scales were never calibrated"
        yield process


def write_dicom(
    path: Path, stored: np.ndarray, sop_class: str, modality: str, photometric: str, rescale
) -> Path:
    """A 12-bit single-frame DICOM of `stored` samples, value = rescale[0] + rescale[1] * stored,
    with its own window (WINDOW_CENTER, WINDOW_WIDTH, in values)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = "20240301"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.Modality, ds.PhotometricInterpretation = modality, photometric
    ds.RescaleIntercept, ds.RescaleSlope = rescale
    ds.WindowCenter, ds.WindowWidth = WINDOW_CENTER, WINDOW_WIDTH
    ds.PixelData = stored.astype(np.uint16).tobytes()
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    path.write_bytes(out.getvalue())
    return path


def with_centre_patch(stored: np.ndarray, value: int) -> np.ndarray:
    """`stored` with a uniform 48-pixel square at its centre, so the canvas's centre pixel is
    that value whatever the zoom and smoothing."""
    rows, cols = stored.shape
    patched = stored.copy()
    patched[rows // 2 - 24 : rows // 2 + 24, cols // 2 - 24 : cols // 2 + 24] = value
    return patched


@pytest.fixture(scope="module")
def dicom_file(rows, tmp_path_factory) -> Path:
    """A real chest X-ray as a 12-bit CT-like DICOM in Hounsfield units (stored - 1024) with its
    own window in HU."""
    xray = next(r for r in rows if r["dataset"] == "covid-cxr")
    gray = Image.open(xray["image"]).convert("L")
    gray.thumbnail((512, 512))
    stored = with_centre_patch(np.asarray(gray, dtype=np.uint16) * 16, PATCH_HU + 1024)
    path = tmp_path_factory.mktemp("dicom") / "chest.dcm"
    return write_dicom(path, stored, CTImageStorage, "CT", "MONOCHROME2", (-1024, 1))


@pytest.fixture(scope="module")
def monochrome1_file(tmp_path_factory) -> Path:
    """A computed radiograph stored MONOCHROME1 (white is low), rescaled (value = 2 * stored -
    100), with its own window: the service sends it inverted, with a negative slope."""
    ramp = np.tile(np.linspace(0, 4000, 160, dtype=np.float64), (160, 1)).round()
    stored = with_centre_patch(ramp.astype(np.uint16), (PATCH_HU + 100) // 2)
    path = tmp_path_factory.mktemp("dicom") / "inverted.dcm"
    return write_dicom(path, stored, SecondaryCaptureImageStorage, "CR", "MONOCHROME1", (-100, 2))


def ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [int(r["id"]) for r in response.json()["results"]]


def card_ids(page) -> list[int]:
    return [
        int(i) for i in page.locator("#grid .card").evaluate_all("cs => cs.map(c => c.dataset.id)")
    ]


def settle(page) -> None:
    page.wait_for_function("document.body.getAttribute('aria-busy') === 'false'")


def drag(page, selector: str, start: tuple[float, float], end: tuple[float, float], **keys) -> None:
    """Drag over an element between two points given as fractions of its box."""
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + box["width"] * start[0], box["y"] + box["height"] * start[1])
    page.mouse.down(**keys)
    page.mouse.move(box["x"] + box["width"] * end[0], box["y"] + box["height"] * end[1], steps=6)
    page.mouse.up(**keys)


def image_rect(page) -> list[float]:
    """Where the viewer draws the image in its stage: x, y, width, height (CSS px)."""
    return [float(v) for v in page.get_attribute("#viewer-stage", "data-rect").split(",")]


def drag_on_image(page, start: tuple[float, float], end: tuple[float, float], **keys) -> None:
    """Drag between two points given as fractions of the image the viewer shows."""
    stage = page.locator("#viewer-stage").bounding_box()
    x, y, width, height = image_rect(page)
    at = [(stage["x"] + x + width * fx, stage["y"] + y + height * fy) for fx, fy in (start, end)]
    page.mouse.move(*at[0])
    page.mouse.down(**keys)
    page.mouse.move(*at[1], steps=6)
    page.mouse.up(**keys)


CENTRE_PIXEL = (
    "() => { const c = document.querySelector('#viewer-image');"
    " return [...c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data]; }"
)
CENTRE_GREY = f"({CENTRE_PIXEL})()[0]"
PAINTED = (
    "() => { const c = document.querySelector('#viewer-overlay');"
    " return c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
    ".filter((v, i) => i % 4 === 3 && v > 0).length; }"
)


def type_window(page, center: float, width: float, grey: int) -> None:
    """Type a window into the viewer's inputs (in what the values stand for) and wait for the
    canvas's centre (the DICOMs' uniform patch) to show the grey it implies."""
    page.fill("#wl-width", str(width))
    page.fill("#wl-center", str(center))
    page.press("#wl-center", "Tab")
    page.wait_for_function(f"Math.abs({CENTRE_GREY} - {grey}) <= 1")


# -- the walk --------------------------------------------------------------------------------------


def test_page_walk_report_viewer_refine_share_and_upload(
    server, client, dicom_file, monochrome1_file
):
    plain = client.post("/v1/search/text", json={"text": QUERY, "k": K})
    assert plain.status_code == 200, plain.text
    results = plain.json()["results"]
    # the card whose report panel is opened: its matched sentence, and a sentence denying a finding
    reports = {r["id"]: client.get(f"/v1/images/{r['id']}/report").json() for r in results}
    denying = [
        r for r in results
        if (r["evidence"] or {}).get("sentence")
        and any(f["status"] == "absent" for s in reports[r["id"]]["sentences"] for f in s["findings"])
    ]  # fmt: skip
    assert denying, [(r["evidence"], reports[r["id"]]) for r in results][:3]
    opened = denying[0]

    with browser_page() as (browser, page, expect):
        page.goto(server.url + "/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        cards = page.locator("#grid .card")

        # a text query: the API's cards, each with its calibrated label beside the score
        page.fill("#query", QUERY)
        page.fill("#k", str(K))
        page.click("#search-button")
        expect(cards).to_have_count(K)
        assert card_ids(page) == [int(r["id"]) for r in results]
        labels = page.locator("#grid .match").all_inner_texts()
        assert labels == [f"{r['match']} match" for r in results]

        # the report panel: the whole report, the matched sentence highlighted, denials tagged
        card = page.locator(f"#grid .card[data-id='{opened['id']}']")
        card.locator(".open-report").click()
        panel = page.locator("#report-panel")
        expect(panel).to_have_attribute("data-loaded", "true")
        text = panel.locator("#report-text")
        expect(text.locator("mark.matched")).to_have_count(1)
        assert (
            text.locator("mark.matched")
            .inner_text()
            .startswith(opened["evidence"]["sentence"].strip())
        )
        denied = [
            s for s in reports[opened["id"]]["sentences"]
            if any(f["status"] == "absent" for f in s["findings"])
        ]  # fmt: skip
        expect(text.locator(".sentence.denied")).to_have_count(len(denied))
        expect(text.locator(".tag.denied").first).to_contain_text("denied")
        said = " ".join(text.inner_text().split())
        for sentence in reports[opened["id"]]["sentences"]:
            assert " ".join(sentence["text"].split()) in said

        # the viewer: full size, window/level by the inputs and by right-drag, the heat-map, keys
        page.click("#report-view")
        viewer = page.locator("#viewer")
        expect(viewer).to_have_attribute("data-loaded", "true")
        pixels = client.get(f"/v1/images/{opened['id']}/pixels")
        assert pixels.status_code == 200, pixels.text
        expect(page.locator("#viewer-status")).to_contain_text(
            f"{pixels.headers['X-Width']} × {pixels.headers['X-Height']}"
        )
        assert float(page.input_value("#wl-center")) == pytest.approx(
            float(pixels.headers["X-Window-Center"]), abs=0.01
        )
        before = page.evaluate(CENTRE_PIXEL)[0]
        # a one-value window above (below) every value turns the image black (white)
        black = before > 127
        edge = float(pixels.headers["X-Value-Max" if black else "X-Value-Min"])
        page.fill("#wl-width", "1")
        page.fill("#wl-center", str(edge + 10 if black else edge - 10))
        page.press("#wl-center", "Tab")
        page.wait_for_function(f"({CENTRE_PIXEL})()[0] === {0 if black else 255}")
        windowed = page.input_value("#wl-width")
        drag_on_image(page, (0.5, 0.5), (0.7, 0.4), button="right")
        assert page.input_value("#wl-width") != windowed  # right-drag moved the window
        page.click("#wl-reset")
        expect(page.locator("#wl-width")).to_have_value(
            re.compile(rf"^{float(pixels.headers['X-Window-Width']):g}")
        )
        page.click("#viewer-why")
        expect(viewer).to_have_attribute("data-heat", "drawn", timeout=60_000)
        assert page.evaluate(PAINTED) > 0
        position = page.locator("#viewer-position")
        at = card_ids(page).index(int(opened["id"])) + 1
        expect(position).to_have_text(f"{at} of {K}")
        page.keyboard.press("ArrowRight" if at < K else "ArrowLeft")
        expect(position).to_have_text(f"{at + 1 if at < K else at - 1} of {K}")
        page.keyboard.press("Escape")
        expect(viewer).not_to_be_visible()
        page.click("#report-close")
        expect(panel).to_be_hidden()

        # Like two, Not one, Refine: the API's refine with the same ids
        shown = card_ids(page)
        liked, disliked = [str(shown[3]), str(shown[5])], [str(shown[0])]
        for id_ in liked:
            page.locator(f"#grid .card[data-id='{id_}'] .like").click()
        page.locator(f"#grid .card[data-id='{disliked[0]}'] .dislike").click()
        expect(page.locator("#refine-button")).to_contain_text("2 liked, 1 not")
        page.click("#refine-button")
        expect(page.locator("#results-title")).to_contain_text("refined (2 liked, 1 not)")
        refine = {"text": QUERY, "liked": liked, "disliked": disliked, "k": K}
        assert card_ids(page) == ids(client.post("/v1/search/refine", json=refine))

        # a control change keeps the refinement
        page.select_option("#group-by", "none")
        settle(page)
        expect(page).to_have_url(re.compile(r"group=none"))
        expected = ids(client.post("/v1/search/refine", json={**refine, "group_by": "none"}))
        assert expected != ids(
            client.post("/v1/search/text", json={"text": QUERY, "k": K, "group_by": "none"})
        )
        expect(cards).to_have_count(len(expected))
        assert card_ids(page) == expected
        expect(page.locator("#results-title")).to_contain_text("refined")

        # the URL carries it all: a new page shows the same results
        expect(page).to_have_url(re.compile(r"liked=.*disliked="))
        other = browser.new_page()
        other.goto(page.url)
        expect(other.locator("body")).to_have_attribute("data-ready", "true")
        expect(other.locator("#grid .card")).to_have_count(len(expected))
        assert card_ids(other) == expected
        expect(other.locator("#results-title")).to_contain_text("refined (2 liked, 1 not)")
        other.close()

        # a DICOM upload, kept by the service: a region of it, Refine, "Why?"
        page.set_input_files("#file-input", str(dicom_file))
        expect(page.locator("#results-title")).to_contain_text(
            f"Cases similar to {dicom_file.name}"
        )
        settle(page)
        upload_id = re.search(r"upload=([\w-]+)", page.url).group(1)
        whole = {"upload_id": upload_id, "k": str(K), "group_by": "none"}
        assert card_ids(page) == ids(client.post("/v1/search/image", data=whole))
        expect(page.locator("#suggest-panel")).to_be_visible()
        # its link reopens it by upload_id alone: results, and what similar cases said
        other = browser.new_page()
        other.goto(page.url)
        expect(other.locator("#grid .card")).to_have_count(K)
        assert card_ids(other) == card_ids(page)
        expect(other.locator("#suggest-panel")).to_be_visible()
        expect(other.locator("#suggest-panel .sentences li").first).to_be_visible()
        other.close()
        # the viewer: the CT's own window, in Hounsfield units, and a window typed in HU
        page.click("#query-region")
        expect(viewer).to_have_attribute("data-loaded", "true")
        assert float(page.input_value("#wl-center")) == WINDOW_CENTER  # the DICOM's own window
        assert float(page.input_value("#wl-width")) == WINDOW_WIDTH
        expect(page.locator("#wl-unit")).to_have_text("HU")
        expect(page.locator("#viewer-status")).to_contain_text(f"window {WINDOW_CENTER} HU")
        type_window(page, TYPED_CENTER, TYPED_WIDTH, 64)
        drag_on_image(page, (0.1, 0.2), (0.6, 0.7))
        page.click("#viewer-region-search")
        expect(page.locator("#results-title")).to_contain_text("(region)")
        settle(page)
        box = re.search(r"box=([\d.%C,]+)", page.url).group(1).replace("%2C", ",")
        assert [float(v) for v in box.split(",")] == pytest.approx([0.1, 0.2, 0.6, 0.7], abs=0.03)
        region = ids(client.post("/v1/search/image", data={**whole, "box": box}))
        assert card_ids(page) == region

        chosen = str(card_ids(page)[2])
        page.locator(f"#grid .card[data-id='{chosen}'] .like").click()
        page.click("#refine-button")
        expect(page.locator("#results-title")).to_contain_text("refined (1 liked, 0 not)")
        settle(page)
        kept = {"upload_id": upload_id, "box": box, "liked": [chosen], "k": K, "group_by": "none"}
        refined = client.post("/v1/search/refine", json=kept)
        assert card_ids(page) == ids(refined)  # the region stays the query
        assert re.search(r"box=", page.url) and re.search(rf"liked={chosen}", page.url)
        by_like = client.post(
            "/v1/search/refine", json={"liked": [chosen], "k": K, "group_by": "none"}
        )
        assert ids(refined) != ids(by_like)  # the upload is still the query, not the Like alone

        cards.first.locator(".why").click()
        expect(viewer).to_have_attribute("data-heat", "drawn", timeout=60_000)
        assert page.evaluate(PAINTED) > 0
        page.keyboard.press("Escape")
        expect(viewer).not_to_be_visible()

        # MONOCHROME1 (white is low, a negative slope): its own window and a typed one in its
        # values, no unit; the patch shows bright where a MONOCHROME2 image shows it dark
        page.set_input_files("#file-input", str(monochrome1_file))
        expect(page.locator("#results-title"), page.inner_text("#message")).to_contain_text(
            monochrome1_file.name, timeout=30_000
        )
        settle(page)
        page.click("#query-region")
        expect(viewer).to_have_attribute("data-loaded", "true")
        assert float(page.input_value("#wl-center")) == WINDOW_CENTER
        assert float(page.input_value("#wl-width")) == WINDOW_WIDTH
        expect(page.locator("#wl-unit")).to_have_text("")
        type_window(page, TYPED_CENTER, TYPED_WIDTH, 191)
        page.keyboard.press("Escape")


# -- what the page never shows ---------------------------------------------------------------------

PATH = re.compile(r"(?:[\w.-]+/)+[\w.-]+\.(?:jpe?g|png|dcm|dicom|csv)\b|(?:^|\s)/[\w.-]+/", re.I)
HASH = re.compile(r"\b[0-9a-f]{12,}\b", re.I)
SPLIT = re.compile(r"\bsplit\b", re.I)


def test_no_card_facet_or_page_text_shows_a_path_a_hash_or_split(server, client, rows):
    fingerprint = client.get("/readyz").json()["model_fingerprint"]
    scale = client.post("/v1/search/text", json={"text": QUERY, "k": 20}).json()["scale"]
    with browser_page() as (_browser, page, expect):
        page.goto(f"{server.url}/?{urlencode({'q': QUERY, 'k': 20, 'group': 'none'})}")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#grid .card")).to_have_count(20)
        expect(page.locator("#controls")).to_have_attribute("open", "")
        options = page.locator("#filters option").all_inner_texts()
        text = page.locator("body").inner_text() + "\n" + "\n".join(options)
        first = page.locator("#grid .card").first
        first.locator(".open-report").click()  # the report panel: licence and source, still none
        expect(page.locator("#report-panel")).to_have_attribute("data-loaded", "true")
        text += "\n" + page.locator("#report-panel").inner_text()
        alts = page.locator("#grid .thumb").evaluate_all("imgs => imgs.map(i => i.alt)")
        any_options = page.locator("#filters option[value='']").all_inner_texts()
        hint = page.locator("#min-score-scale").inner_text()
    assert options, "the facets offer menus"
    for name, pattern in (("a path", PATH), ("a hash", HASH), ("split", SPLIT)):
        assert not pattern.search(text), f"{name}: {pattern.search(text)}"
    assert fingerprint not in text
    assert not any(PATH.search(alt) for alt in alts)
    assert set(any_options) == {"any"}  # "any" carries no count: it does not read like a filter
    assert "train" not in options and not any(o.startswith("train ") for o in options)
    assert f"strong match ≥ {scale['strong']:.2f}" in hint
    assert f"{scale['low']:.2f}–{scale['high']:.2f}" in hint
