"""Uploads kept for their uploader (upload_id), the viewer's pixels and the score labels, through
a real server (keys and an audit log) on a real small index: medpix and covid-cxr images, and a
real DICOM (pydicom's CT_small with a window of its own), built with a small untrained bundle.

upload -> upload_id -> a region of it -> refine (the upload stays the query) -> "Why?" on it;
another key's upload_id is a 404, the oldest upload is evicted past the count; pixels keep a
DICOM's values and window; results carry match labels consistent with the calibrated scale.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import calibrated_scales, error_of, index_of_rows, server_settings, serving
from PIL import Image
from pydicom.pixels import apply_modality_lut

from convirt.bundle import load_bundle
from convirt.imageio import load_image
from convirt.inference import Embedder
from index.read.store import open_current
from service.errors import NotFound
from service.model.region import Box, crop_to_box
from service.search import calibration
from service.search.feedback import rocchio
from service.search.kept import KeptUploads

FIELDS = ["image", "text", "dataset", "modality", "case_id", "patient_id"]
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
WINDOW = (40.0, 400.0)  # the DICOM's own centre and width, Hounsfield units
QUERY = "Axial CT image of the chest showing a mass in the lung."
KEEP = 4  # CONVIRT_UPLOAD_KEEP of the server
ROLE = ("--role", "reader", "--name")


def windowed_ct() -> bytes:
    ds = pydicom.dcmread(CT_SMALL)
    ds.WindowCenter, ds.WindowWidth = WINDOW
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dicom") / "ct.dcm"
    path.write_bytes(windowed_ct())
    return path


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle_dir, datasets, ct_path) -> Path:
    medpix = [r for r in read_csv(datasets / "medpix" / "manifest.csv") if r["split"] == "train"]
    covid = [r for r in read_csv(datasets / "covid-cxr" / "manifest.csv") if r["split"] == "train"]
    rows = [
        {"image": str(datasets / "medpix" / r["image"]), "text": r["text"], "dataset": "medpix"}
        | {"modality": r["modality"], "case_id": r["case_id"]}
        for r in medpix[:30]
    ] + [
        {"image": str(datasets / "covid-cxr" / r["image"]), "text": r["text"]}
        | {"dataset": "covid-cxr", "modality": r["modality"], "patient_id": r["patient_id"]}
        for r in covid[:10]
    ]
    rows.append({"image": str(ct_path), "text": "Axial CT of the chest.", "dataset": "dicom"})
    return index_of_rows(tmp_path_factory.mktemp("kept"), bundle_dir, rows, FIELDS)


def add_key(db: Path, name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "convirt.cli", *("keys", "add", "--db", str(db)), *ROLE, name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kept-state")


@pytest.fixture(scope="module")
def keys(state) -> dict[str, str]:
    return {name: add_key(state / "keys.sqlite", name) for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def server(bundle_dir, index_root, state, keys) -> Iterator:
    settings = server_settings(
        bundle_dir,
        index_root,
        CONVIRT_AUTH_DB=state / "keys.sqlite",
        CONVIRT_AUDIT_LOG=state / "audit.jsonl",
        CONVIRT_UPLOAD_KEEP=KEEP,
        CONVIRT_EXPLAIN_WORKER="thread",
    )
    with serving(settings) as process:
        yield process


@pytest.fixture(scope="module")
def alice(server, keys) -> Iterator[httpx.Client]:
    with client_of(server, keys["alice"]) as session:
        yield session


@pytest.fixture(scope="module")
def bob(server, keys) -> Iterator[httpx.Client]:
    with client_of(server, keys["bob"]) as session:
        yield session


def client_of(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120, headers={"X-API-Key": key})


@pytest.fixture(scope="module")
def by_id(index_root) -> dict[int, dict]:
    with open_current(index_root) as store:
        return store.get_many(store.ids.tolist())


def upload(client: httpx.Client, data: bytes, name: str = "q.dcm", **form) -> dict:
    kind = "application/dicom" if name.endswith(".dcm") else "image/png"
    files = {"file": (name, data, kind)}
    response = client.post("/v1/search/image", files=files, data=form)
    assert response.status_code == 200, response.text
    return response.json()


def ids(results: list[dict]) -> list[int]:
    return [int(r["id"]) for r in results]


def samples_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["cache-control"].startswith("private")
    width, height = int(response.headers["x-width"]), int(response.headers["x-height"])
    return np.frombuffer(response.content, "<u2").reshape(height, width)


def values_of(response: httpx.Response) -> np.ndarray:
    slope = float(response.headers["x-rescale-slope"])
    return samples_of(response) * slope + float(response.headers["x-rescale-intercept"])


# -- an upload kept for its uploader ---------------------------------------------------------------


def test_an_upload_stays_the_query_for_a_region_a_refinement_and_a_heat_map(
    alice, bundle_dir, index_root, state
):
    data = windowed_ct()
    first = upload(alice, data, k=8, group_by="none")
    upload_id = first["upload_id"]
    assert len(upload_id) >= 20 and upload_id.replace("-", "").replace("_", "").isalnum()
    # the same search by its id, without the file: the same answer
    again = alice.post(
        "/v1/search/image", data={"upload_id": upload_id, "k": 8, "group_by": "none"}
    )
    assert again.status_code == 200, again.text
    assert ids(again.json()["results"]) == ids(first["results"])
    assert again.json()["upload_id"] == upload_id
    # a region of it, by its id, is what the same region sent as a file finds
    box = {"box": "0.1,0.1,0.7,0.7", "k": 8, "group_by": "none"}
    region = alice.post("/v1/search/image", data={"upload_id": upload_id, **box})
    assert region.status_code == 200, region.text
    assert ids(region.json()["results"]) == ids(upload(alice, data, **box)["results"])
    assert ids(region.json()["results"]) != ids(first["results"])
    # refine: the upload stays the query, moved toward the liked image (not replaced by it)
    liked = first["results"][3]["id"]
    refine = {"upload_id": upload_id, "liked": [liked], "k": 8, "group_by": "none"}
    refined = alice.post("/v1/search/refine", json=refine)
    assert refined.status_code == 200, refined.text
    embedder = Embedder(load_bundle(bundle_dir))
    vector = embedder.embed_images([load_image(data)])[0][0]
    with open_current(index_root) as store:
        liked_vector = store.vectors_of([int(liked)], "encoder")
        expected = store.search("encoder", rocchio(vector, liked_vector, liked_vector[:0]), 8)
        from_liked = store.search("encoder", liked_vector[0], 8)
    assert ids(refined.json()["results"]) == [hit.id for hit in expected]
    assert ids(refined.json()["results"]) != [hit.id for hit in from_liked]
    # "Why?" on the upload: a heat-map of a result for its similarity to the upload
    result = first["results"][0]
    why = alice.get("/v1/explain", params={"image_id": result["id"], "upload_id": upload_id})
    assert why.status_code == 200, why.text
    assert why.headers["x-explain-cache"] == "miss"
    assert why.json()["space"] == "encoder"
    assert why.json()["score"] == pytest.approx(result["score"], abs=0.02)
    assert np.array(why.json()["grid"]).std() > 0
    by_liked = alice.get("/v1/explain", params={"image_id": result["id"], "query_id": liked})
    assert not np.allclose(by_liked.json()["grid"], why.json()["grid"])
    cached = alice.get("/v1/explain", params={"image_id": result["id"], "upload_id": upload_id})
    assert cached.headers["x-explain-cache"] == "hit"
    # the audit log notes a search by upload_id as the upload it stands for (its hash)
    entries = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    hashes = [e.get("upload_hash") for e in entries if e["endpoint"] == "/v1/search/image"]
    assert len(hashes) >= 3 and hashes[0] and hashes[1] == hashes[0]
    explained = next(e for e in entries if e["endpoint"] == "/v1/explain")
    assert explained.get("upload_hash") == hashes[0]


def test_a_refined_region_stays_the_query(alice, bundle_dir, index_root):
    data = windowed_ct()
    box = "0.1,0.1,0.7,0.7"
    controls = {"k": 8, "group_by": "none"}
    upload_id = upload(alice, data, **controls)["upload_id"]
    region = alice.post("/v1/search/image", data={"upload_id": upload_id, "box": box, **controls})
    assert region.status_code == 200, region.text
    # refined with no feedback: the region's search, not the whole image's
    plain = {"upload_id": upload_id, "box": box, "liked": [], **controls}
    unmoved = alice.post("/v1/search/refine", json=plain)
    assert unmoved.status_code == 200, unmoved.text
    assert ids(unmoved.json()["results"]) == ids(region.json()["results"])
    whole = alice.post("/v1/search/refine", json={**plain, "box": None})
    assert ids(whole.json()["results"]) != ids(region.json()["results"])
    # with a liked image: Rocchio from the region's vector
    liked = region.json()["results"][4]["id"]
    refined = alice.post("/v1/search/refine", json={**plain, "liked": [liked]})
    assert refined.status_code == 200, refined.text
    embedder = Embedder(load_bundle(bundle_dir))
    cropped = crop_to_box(load_image(data), Box(0.1, 0.1, 0.7, 0.7))
    vector = embedder.embed_images([cropped])[0][0]
    with open_current(index_root) as store:
        liked_vector = store.vectors_of([int(liked)], "encoder")
        expected = store.search("encoder", rocchio(vector, liked_vector, liked_vector[:0]), 8)
    assert ids(refined.json()["results"]) == [hit.id for hit in expected]
    assert ids(refined.json()["results"]) != ids(region.json()["results"])
    # a region of an indexed image, likewise: its similar cases by that box, itself left out
    image_id = region.json()["results"][0]["id"]
    similar = alice.get(
        f"/v1/images/{image_id}/similar", params={"box": box, "k": 9, "group_by": "none"}
    )
    assert similar.status_code == 200, similar.text
    by_box = {"image_id": image_id, "box": box, "liked": [], **controls}
    indexed = alice.post("/v1/search/refine", json=by_box)
    assert indexed.status_code == 200, indexed.text
    others = [i for i in ids(similar.json()["results"]) if i != int(image_id)][:8]
    assert ids(indexed.json()["results"]) == others
    unboxed = alice.post("/v1/search/refine", json={**by_box, "box": None})
    assert ids(unboxed.json()["results"]) != others
    # a box needs an image to be a region of; a malformed one is refused as the searches do
    for wrong in ({"liked": [liked], "box": box}, {"text": QUERY, "box": box}):
        error_of(alice.post("/v1/search/refine", json=wrong), 422)
    error_of(
        alice.post("/v1/search/refine", json={**plain, "box": "0.5,0.5,0.2,0.9"}),
        422,
        "invalid_box",
    )


def test_what_similar_cases_said_of_a_kept_upload(alice, bob):
    data = windowed_ct()
    upload_id = upload(alice, data, k=3)["upload_id"]
    by_file = alice.post(
        "/v1/reports/suggest", files={"file": ("q.dcm", data, "application/dicom")}
    )
    by_id = alice.post("/v1/reports/suggest", data={"upload_id": upload_id})
    assert by_file.status_code == 200 and by_id.status_code == 200, by_id.text
    assert by_id.json()["sentences"]
    same = ("sentences", "draft", "cases")
    assert {k: by_id.json()[k] for k in same} == {k: by_file.json()[k] for k in same}
    unknown = bob.post("/v1/reports/suggest", data={"upload_id": upload_id})
    assert "upload the image again" in error_of(unknown, 404, "unknown_upload")["message"]
    both = alice.post("/v1/reports/suggest", data={"upload_id": upload_id, "image_id": "1"})
    error_of(both, 422, "invalid_query")
    with_file = alice.post(
        "/v1/reports/suggest",
        data={"upload_id": upload_id},
        files={"file": ("q.dcm", data, "application/dicom")},
    )
    error_of(with_file, 422, "invalid_query")


def test_an_upload_id_is_its_uploaders_only_and_refused_when_unknown(alice, bob):
    upload_id = upload(alice, windowed_ct(), k=3)["upload_id"]
    results = alice.post("/v1/search/image", data={"upload_id": upload_id}).json()["results"]
    tries = [
        bob.post("/v1/search/image", data={"upload_id": upload_id}),
        bob.post("/v1/search/refine", json={"upload_id": upload_id}),
        bob.get("/v1/explain", params={"image_id": results[0]["id"], "upload_id": upload_id}),
        bob.get(f"/v1/uploads/{upload_id}/pixels"),
        alice.post("/v1/search/image", data={"upload_id": "never-given-out-token"}),
    ]
    for response in tries:
        assert "upload the image again" in error_of(response, 404, "unknown_upload")["message"]
    # exactly one of file and upload_id; one query for refine
    with_both = alice.post(
        "/v1/search/image",
        data={"upload_id": upload_id},
        files={"file": ("q.dcm", windowed_ct(), "application/dicom")},
    )
    assert error_of(with_both, 422, "invalid_request")
    assert error_of(alice.post("/v1/search/image", data={"k": 3}), 422, "invalid_request")
    both = alice.post("/v1/search/refine", json={"upload_id": upload_id, "text": QUERY})
    error_of(both, 422)


def test_the_least_recently_used_upload_goes_past_the_count(alice):
    first = upload(alice, windowed_ct(), k=1)["upload_id"]
    for seed in range(KEEP):
        noise = np.random.default_rng(seed).integers(0, 255, (64, 64), np.uint8)
        out = io.BytesIO()
        Image.fromarray(noise).save(out, format="PNG")
        upload(alice, out.getvalue(), "noise.png", k=1)
    gone = alice.post("/v1/search/image", data={"upload_id": first})
    error_of(gone, 404, "unknown_upload")


def test_kept_uploads_expire_and_evict_by_count_and_bytes():
    now = [0.0]
    kept = KeptUploads(ttl_s=10, max_entries=3, max_bytes=100, clock=lambda: now[0])
    a = kept.keep("alice", b"a" * 40)
    b = kept.keep("alice", b"b" * 40)
    now[0] = 8
    assert kept.get("alice", a.id) is a  # used: its life starts again
    with pytest.raises(NotFound):
        kept.get("bob", a.id)
    now[0] = 12  # b unused for 12 s: expired; a used 4 s ago: kept
    with pytest.raises(NotFound, match="upload the image again"):
        kept.get("alice", b.id)
    assert kept.get("alice", a.id) is a
    c = kept.keep("alice", b"c" * 40)
    kept.keep("bob", b"d" * 40)  # 120 bytes past the 100: the least recently used (a) goes
    with pytest.raises(NotFound):
        kept.get("alice", a.id)
    assert kept.get("alice", c.id).data == b"c" * 40 and len(kept) == 2
    for _ in range(3):
        kept.keep("carol", b"e")
    assert len(kept) == 3  # by count: c and d went


# -- the viewer's pixels ---------------------------------------------------------------------------


def test_dicom_pixels_keep_their_values_and_window(alice, by_id, ct_path):
    ds = pydicom.dcmread(ct_path)
    hounsfield = apply_modality_lut(ds.pixel_array, ds)
    upload_id = upload(alice, ct_path.read_bytes(), k=1)["upload_id"]
    indexed = next(i for i, row in by_id.items() if row["relpath"].endswith("ct.dcm"))
    for path in (f"/v1/uploads/{upload_id}/pixels", f"/v1/images/{indexed}/pixels"):
        response = alice.get(path)
        values = values_of(response)
        assert values.shape == hounsfield.shape and hounsfield.min() < 0
        assert np.array_equal(values, hounsfield)
        head = response.headers
        slope, intercept = float(head["x-rescale-slope"]), float(head["x-rescale-intercept"])
        assert float(head["x-window-center"]) * slope + intercept == WINDOW[0]
        assert float(head["x-window-width"]) * abs(slope) == WINDOW[1]
        assert int(head["x-original-width"]) == ds.Columns
        assert head["x-value-unit"] == "HU"  # a CT: the viewer labels its window in HU
        samples = samples_of(response)
        assert (int(head["x-value-min"]), int(head["x-value-max"])) == (
            samples.min(),
            samples.max(),
        )


def test_jpeg_pixels_are_its_grey_values_with_its_full_range(alice, by_id):
    image_id, row = next((i, r) for i, r in by_id.items() if r["relpath"].endswith(".jpg"))
    response = alice.get(f"/v1/images/{image_id}/pixels")
    expected = np.asarray(load_image(row["path"]))
    assert np.array_equal(samples_of(response), expected)
    head = response.headers
    assert float(head["x-window-width"]) == expected.max() - expected.min()
    assert float(head["x-window-center"]) == (int(expected.max()) + int(expected.min())) / 2
    assert head["x-rescale-slope"] == "1" and head["x-rescale-intercept"] == "0"
    assert "x-value-unit" not in head  # plain values: no unit to label


def test_large_uploads_are_area_downsampled_to_2048(alice):
    ramp = np.tile(np.linspace(0, 255, 3000).astype(np.uint8), (1000, 1))
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")
    upload_id = upload(alice, out.getvalue(), "ramp.png", k=1)["upload_id"]
    response = alice.get(f"/v1/uploads/{upload_id}/pixels")
    samples = samples_of(response)
    assert samples.shape == (683, 2048)
    assert (response.headers["x-original-width"], response.headers["x-original-height"]) == (
        "3000",
        "1000",
    )
    assert np.all(np.diff(samples[0].astype(int)) >= 0)  # still a ramp, left to right


# -- score labels ----------------------------------------------------------------------------------


def scales(client: httpx.Client) -> dict[str, dict]:
    return calibrated_scales(client, timeout=60)


def test_scores_are_calibrated_from_the_index_for_every_kind(alice, index_root):
    found = scales(alice)
    assert set(found) == set(calibration.KINDS)
    for scale in found.values():
        assert scale["low"] <= scale["possible"] <= scale["strong"] <= scale["high"]
    # the index holds fewer images than the sample: every image was a query, itself left out
    with open_current(index_root) as store:
        best = [
            store.search("encoder", store.vectors["encoder"][row], 1, exclude={int(i)})[0].score
            for row, i in enumerate(store.ids)
        ]
    assert found["image"]["strong"] == pytest.approx(np.median(best), abs=1e-4)


@pytest.mark.parametrize(
    "mode, kind", [(None, "text_hybrid"), ("image", "text_dense"), ("report", "text_report")]
)
def test_results_carry_match_labels_on_their_kinds_scale(alice, mode, kind):
    scales(alice)
    body = {"text": QUERY, "k": 40, "group_by": "none"} | ({"mode": mode} if mode else {})
    response = alice.post("/v1/search/text", json=body)
    assert response.status_code == 200, response.text
    scale = response.json()["scale"]
    assert scale["kind"] == kind
    for result in response.json()["results"]:
        expected = calibration.label(result["score"], calibration.Scale(**scale, queries=0))
        assert result["match"] == expected
    if kind == "text_dense":  # cosines spread over the scale: more than one label
        assert len({r["match"] for r in response.json()["results"]}) > 1


def test_image_searches_carry_the_image_scale(alice, by_id):
    scales(alice)
    similar = alice.get(f"/v1/images/{next(iter(by_id))}/similar", params={"k": 5}).json()
    assert similar["scale"]["kind"] == "image"
    assert all(r["match"] in calibration.MATCHES for r in similar["results"])
    assert upload(alice, windowed_ct(), k=3)["scale"]["kind"] == "image"


def test_the_label_thresholds_are_ordered_and_need_enough_queries():
    scale = calibration.scale_of("image", np.linspace(0.8, 1.0, 50), np.linspace(0.6, 0.8, 50))
    assert scale is not None and scale.strong == pytest.approx(0.9)
    assert scale.possible == pytest.approx(0.7)
    labels = [calibration.label(s, scale) for s in (0.95, 0.9, 0.75, 0.69)]
    assert labels == ["strong", "strong", "possible", "weak"]
    assert calibration.scale_of("image", np.ones(3), np.ones(3)) is None
    assert calibration.text_kind("image", "rrf") == "text_dense"
    assert calibration.text_kind("hybrid", "rrf") == "text_hybrid_rrf"
