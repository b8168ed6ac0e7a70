"""The retrieval service: a real `convirt serve` process (uvicorn on loopback) over a real index.

One index of 30 real images (medpix and covid-cxr JPEGs with their reports, two DICOM files) is
built with a small untrained bundle; one server serves it for the whole module. The reload tests
come last: they publish new versions while queries run.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.etree import ElementTree

import httpx
import numpy as np
import pydicom
import pytest
from conftest import (
    INDEX_OPTIONS,
    browser_page,
    error_of,
    make_bundle,
    server_settings,
    serving,
)
from PIL import Image
from serving import LOOPBACK, ServerProcess

from convirt.bundle import load_bundle, read_bundle_info
from convirt.imageio import load_image
from convirt.inference import Embedder
from index import layout
from index.read.store import open_current
from index.sources.manifest import read_manifest
from index.write.build import add, build
from service import cli

API_KEY = "test-admin-key"
IMAGE_BATCH = 2
UPLOAD_LIMIT = 2_000_000
JSON_LIMIT = 100_000
TEXT_LIMIT = 20_000
DICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FIELDS = ["image", "text", "collection", "modality", "view", "location_category"]


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def embedder(bundle) -> Embedder:
    return Embedder(bundle)


def medpix_rows(datasets: Path, split: str, count: int) -> list[dict[str, str]]:
    with open(datasets / "medpix" / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split][:count]
    return [
        {
            "image": str(datasets / "medpix" / r["image"]),
            "text": r["text"],
            "collection": "medpix",
            "modality": r["modality"],
            "view": "",
            "location_category": r["location_category"],
        }
        for r in rows
    ]


def covid_rows(datasets: Path, count: int) -> list[dict[str, str]]:
    with open(datasets / "covid-cxr" / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"][:count]
    return [
        {
            "image": str(datasets / "covid-cxr" / r["image"]),
            "text": r["text"],
            "collection": "covid-cxr",
            "modality": r["modality"],
            "view": r["view"],
            "location_category": "Thorax",
        }
        for r in rows
    ]


def dicom_rows() -> list[dict[str, str]]:
    return [
        {"image": str(DICOM_FILES / name), "text": "", "collection": "dicom"}
        for name in ("CT_small.dcm", "MR_small.dcm")
    ]


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    """A manifest of absolute paths into the shared data (nothing is copied)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def rows(datasets) -> list[dict[str, str]]:
    return medpix_rows(datasets, "train", 22) + covid_rows(datasets, 6) + dicom_rows()


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle, rows) -> Path:
    folder = tmp_path_factory.mktemp("index")
    build(
        folder / "root",
        bundle,
        read_manifest(write_manifest(folder / "m.csv", rows)),
        INDEX_OPTIONS,
    )
    return folder / "root"


@pytest.fixture(scope="module")
def ids_by_path(index_root) -> dict[str, int]:
    with open_current(index_root) as store:
        return {row["path"]: i for i, row in store.get_many(store.ids.tolist()).items()}


@pytest.fixture(scope="module")
def server(bundle_dir, index_root) -> Iterator[ServerProcess]:
    settings = server_settings(
        bundle_dir,
        index_root,
        CONVIRT_API_KEY=API_KEY,
        CONVIRT_MAX_UPLOAD_BYTES=UPLOAD_LIMIT,
        CONVIRT_MAX_JSON_BYTES=JSON_LIMIT,
        CONVIRT_MAX_TEXT_CHARS=TEXT_LIMIT,
        CONVIRT_BATCH_WINDOW_MS=5,
        CONVIRT_MAX_BATCH=32,
        CONVIRT_MAX_IMAGE_BATCH=IMAGE_BATCH,
    )
    with serving(settings) as process:
        yield process


# -- helpers ---------------------------------------------------------------------------------------


def search_text(client: httpx.Client, text: str, k: int = 5, **extra) -> httpx.Response:
    return client.post("/v1/search/text", json={"text": text, "k": k, **extra})


def upload(client: httpx.Client, name: str, data: bytes, ctype: str, k: int = 5) -> httpx.Response:
    return client.post("/v1/search/image", files={"file": (name, data, ctype)}, data={"k": str(k)})


def result_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [int(r["id"]) for r in response.json()["results"]]


def png_of(path: Path) -> bytes:
    buffer = io.BytesIO()
    load_image(path).save(buffer, format="PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height greyscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def assert_same_ranking(results: list[dict], hits: list, tolerance: float = 1e-4) -> None:
    """Equal scores; equal ids wherever the order is not a near-tie."""
    served = np.array([r["score"] for r in results])
    expected = np.array([h.score for h in hits])
    np.testing.assert_allclose(served, expected, atol=tolerance)
    for n, (result, hit) in enumerate(zip(results, hits, strict=True)):
        neighbours = expected[max(0, n - 1) : n + 2]
        if np.sort(np.abs(neighbours - hit.score))[1:].min(initial=1) > tolerance:
            assert int(result["id"]) == hit.id


def raw_request(port: int, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[bytes, int]:
    """Send a request head, then body chunks until the server answers; (response, bytes sent)."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(head)
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop sending
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        return read_until_closed(sock), sent


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not body_complete(data):
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data


def body_complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    return match is not None and len(body) >= int(match.group(1))


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus series' samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


# -- health, docs, metrics -------------------------------------------------------------------------


def test_health_readiness_and_docs(client, bundle, index_root):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["model_fingerprint"] == bundle.fingerprint
    assert ready["index_version"] == layout.read_current(index_root)
    assert ready["images"] == 30
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    for asset in re.findall(r"""(?:src|href)=['"](/docs-assets/[^'"]+)['"]""", docs.text):
        assert client.get(asset).status_code == 200  # offline docs: assets served locally
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/search/text",
        "/v1/search/image",
        "/v1/images/{image_id}",
        "/v1/images/{image_id}/thumbnail",
        "/v1/images/{image_id}/similar",
        "/v1/admin/reload",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths


def test_help_explains_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for env in (
        "CONVIRT_MODEL",
        "CONVIRT_INDEX_ROOT",
        "CONVIRT_HOST",
        "CONVIRT_PORT",
        "CONVIRT_API_KEY",
        "CONVIRT_MAX_UPLOAD_BYTES",
        "CONVIRT_BATCH_WINDOW_MS",
        "CONVIRT_MAX_BATCH",
        "CONVIRT_MAX_IMAGE_BATCH",
        "CONVIRT_RELOAD_POLL_SECONDS",
    ):
        assert env in text


# -- text search -----------------------------------------------------------------------------------


def test_text_search_returns_k_images_with_urls_metadata_and_reports(
    client, rows, bundle, index_root
):
    response = search_text(client, rows[0]["text"], k=7)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == 7
    assert body["truncated"] is False and body["max_tokens"] == 32
    assert body["took_ms"] > 0
    assert body["index_version"] == layout.read_current(index_root)
    assert body["model_fingerprint"] == bundle.fingerprint
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    for result in body["results"]:
        assert re.fullmatch(r"\d+", result["id"])
        assert result["image_url"] == f"/v1/images/{result['id']}"
        assert result["thumbnail_url"] == f"/v1/images/{result['id']}/thumbnail"
        assert result["similar_url"] == f"/v1/images/{result['id']}/similar"
        assert result["metadata"]["width"] > 0 and result["metadata"]["relpath"]
        assert "path" not in result["metadata"]  # server locations stay private
    reports = {r["text"] for r in rows}
    with_reports = [r for r in body["results"] if r["report"]]
    assert with_reports and all(r["report"] in reports for r in with_reports)
    medpix = [r for r in body["results"] if r["metadata"]["fields"]["collection"] == "medpix"]
    assert all(r["metadata"]["fields"]["location_category"] for r in medpix)


def test_text_search_equals_in_process_search(client, rows, embedder, index_root):
    with open_current(index_root) as store:
        for text in (rows[1]["text"], rows[25]["text"], "No acute cardiopulmonary process."):
            vector = embedder.embed_texts([text]).vectors
            hits = store.search_text_vectors(vector, k=10)[0]
            served = search_text(client, text, k=10, mode="image").json()
            assert served["mode"] == "image"
            assert_same_ranking(served["results"], hits)
            # the default ranks with the reports too: the same as the store's ranking in process
            ranked = store.rank_text(vector[0], text, 10).top(10)
            served = search_text(client, text, k=10, group_by="none").json()
            assert served["mode"] == "hybrid"
            assert_same_ranking(served["results"], ranked)


def test_text_filters(client, rows):
    body = search_text(client, rows[0]["text"], k=30, filters={"collection": "covid-cxr"}).json()
    assert len(body["results"]) == 6
    assert {r["metadata"]["fields"]["collection"] for r in body["results"]} == {"covid-cxr"}
    body = search_text(client, rows[0]["text"], k=30, filters={"modality": "XR"}).json()
    assert {r["metadata"]["modality"] for r in body["results"]} == {"XR"}  # X-ray, normalised
    assert {r["metadata"]["fields"]["modality_original"] for r in body["results"]} == {"X-ray"}
    error_of(search_text(client, "x", filters={"../../etc": "passwd"}), 422, "invalid_filters")
    either = {"collection": ["covid-cxr", "dicom"]}
    assert len(search_text(client, rows[0]["text"], k=30, filters=either).json()["results"]) == 8
    error_of(search_text(client, "x", filters={"collection": [["a"]]}), 422, "invalid_request")


def test_long_text_is_truncated_and_said_so(client):
    long_text = "Small left pleural effusion with adjacent atelectasis. " * 250  # ~14k chars
    body = search_text(client, long_text).json()
    assert body["truncated"] is True and len(body["results"]) == 5
    error_of(search_text(client, "word " * (TEXT_LIMIT // 5 + 1)), 422, "text_too_long")


def test_bad_text_queries_get_clear_422s(client):
    for text in ("", "   ", "\n\t "):
        error = error_of(search_text(client, text), 422, "invalid_request")
        assert "text is empty" in error["message"]
    for k in (0, -1, 101, "many"):
        error = error_of(search_text(client, "effusion", k=k), 422, "invalid_request")
        assert error["details"][0]["field"] == "body.k"
    error_of(client.post("/v1/search/text", json={"k": 3}), 422, "invalid_request")
    error_of(client.post("/v1/search/text", json={"text": "x", "extra": 1}), 422)
    bad_json = client.post(
        "/v1/search/text", content=b'{"text": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in error_of(bad_json, 422, "invalid_request")["message"]
    huge = json.dumps({"text": "a" * (JSON_LIMIT + 10)}).encode()
    error_of(
        client.post("/v1/search/text", content=huge, headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )


# -- image search ----------------------------------------------------------------------------------


def test_image_search_finds_the_uploaded_image_first_in_every_format(client, rows, ids_by_path):
    jpeg = Path(rows[3]["image"])
    dicom = DICOM_FILES / "CT_small.dcm"
    uploads = [
        (jpeg.name, jpeg.read_bytes(), "image/jpeg", ids_by_path[str(jpeg)]),
        ("scan.png", png_of(jpeg), "image/png", ids_by_path[str(jpeg)]),
        (dicom.name, dicom.read_bytes(), "application/dicom", ids_by_path[str(dicom)]),
        ("no-content-type", jpeg.read_bytes(), "application/octet-stream", ids_by_path[str(jpeg)]),
    ]
    for name, data, ctype, expected in uploads:
        response = upload(client, name, data, ctype, k=4)
        body = response.json()
        assert result_ids(response)[0] == expected, name
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(body["results"]) == 4 and "truncated" not in body
        assert body["index_version"] and body["model_fingerprint"]


def test_image_search_equals_in_process_encoder_search(client, rows, embedder, index_root):
    image = Path(rows[10]["image"])
    encoder, _ = embedder.embed_images([load_image(image)])
    with open_current(index_root) as store:
        hits = store.search_image_vectors(encoder, k=8, space="encoder")[0]
    assert_same_ranking(
        upload(client, image.name, image.read_bytes(), "image/jpeg", 8).json()["results"], hits
    )


def test_image_search_filters(client, rows):
    image = Path(rows[0]["image"])
    response = client.post(
        "/v1/search/image",
        files={"file": (image.name, image.read_bytes(), "image/jpeg")},
        data={"k": "30", "filters": json.dumps({"collection": "dicom"})},
    )
    assert len(result_ids(response)) == 2
    response = client.post(
        "/v1/search/image",
        files={"file": (image.name, image.read_bytes(), "image/jpeg")},
        data={"filters": "{not json"},
    )
    error_of(response, 422, "invalid_filters")


def test_bad_uploads_get_clear_4xx_and_the_service_stays_up(client, rows):
    jpeg = Path(rows[0]["image"]).read_bytes()
    cases = [
        (("notes.txt", b"a plain text file\n", "text/plain"), 415, "not_an_image"),
        (("fake.png", b"<html>not a png</html>", "image/png"), 415, "not_an_image"),
        (("empty.jpg", b"", "image/jpeg"), 422, "empty_upload"),
        (("cut.jpg", jpeg[: len(jpeg) // 3], "image/jpeg"), 422, "undecodable_image"),
        (("junk.png", b"\x89PNG\r\n\x1a\n" + b"\x07" * 500, "image/png"), 422, "undecodable_image"),
        (("bomb.png", bomb_png(40_000, 40_000), "image/png"), 413, "too_many_pixels"),
        (("plan.dcm", (DICOM_FILES / "rtplan.dcm").read_bytes(), "application/dicom"), 422, None),
        (
            ("cut.dcm", (DICOM_FILES / "MR_truncated.dcm").read_bytes(), "application/dicom"),
            422,
            None,
        ),
        (("big.jpg", jpeg + b"\x00" * UPLOAD_LIMIT, "image/jpeg"), 413, "body_too_large"),
    ]
    for (name, data, ctype), status, code in cases:
        error = error_of(upload(client, name, data, ctype), status, code)
        if name == "plan.dcm":
            assert "no pixel data" in error["message"]
    for k in ("0", "101", "ten"):
        response = client.post(
            "/v1/search/image", files={"file": ("a.jpg", jpeg, "image/jpeg")}, data={"k": k}
        )
        error_of(response, 422, "invalid_request")
    error_of(client.post("/v1/search/image", data={"k": "3"}), 422, "invalid_request")
    assert client.get("/healthz").status_code == 200
    assert len(result_ids(upload(client, "a.jpg", jpeg, "image/jpeg"))) == 5


def test_oversized_upload_is_refused_before_it_is_read(server):
    """A declared 10 GB body is refused from its headers alone; a chunked one once past the limit."""
    head = (
        b"POST /v1/search/image HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 10000000000\r\n\r\n"
    )
    response, _ = raw_request(server.port, head)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"body_too_large" in response

    def endless_chunks() -> Iterator[bytes]:
        part = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        yield b"%x\r\n%s\r\n" % (len(part), part)
        block = b"\x89PNG" + b"\x00" * 65532
        for _ in range(10 * UPLOAD_LIMIT // len(block)):
            yield b"%x\r\n%s\r\n" % (len(block), block)
            time.sleep(0.001)

    head = (
        b"POST /v1/search/image HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: multipart/form-data; boundary=XX\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    response, sent = raw_request(server.port, head, endless_chunks())
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 4 * UPLOAD_LIMIT  # refused while streaming, not after reading it all


# -- images by id ----------------------------------------------------------------------------------


def test_image_file_and_thumbnail_by_id(client, rows, ids_by_path):
    jpeg = Path(rows[2]["image"])
    response = client.get(f"/v1/images/{ids_by_path[str(jpeg)]}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == jpeg.read_bytes()
    dicom = DICOM_FILES / "MR_small.dcm"
    response = client.get(f"/v1/images/{ids_by_path[str(dicom)]}")
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == dicom.read_bytes()
    response = client.get(f"/v1/images/{ids_by_path[str(jpeg)]}/thumbnail")
    assert response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumbnail:
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == 128


def test_similar_to_an_indexed_image(client, rows, ids_by_path, index_root):
    image_id = ids_by_path[rows[5]["image"]]
    response = client.get(f"/v1/images/{image_id}/similar", params={"k": 6})
    ids = result_ids(response)
    assert len(ids) == 6 and image_id not in ids
    with open_current(index_root) as store:
        assert_same_ranking(response.json()["results"], store.similar_to_id(image_id, 6))
    assert len(result_ids(client.get(f"/v1/images/{image_id}/similar", params={"k": 100}))) == 29
    for k in ("0", "101", "../../etc/passwd"):
        error_of(client.get(f"/v1/images/{image_id}/similar", params={"k": k}), 422)


def test_unknown_and_invalid_ids(client):
    for suffix in ("", "/thumbnail", "/similar"):
        error_of(client.get(f"/v1/images/12345{suffix}"), 404, "unknown_id")
        for bad in ("-1", "9223372036854775808", "abc", "1.5"):
            error_of(client.get(f"/v1/images/{bad}{suffix}"), 422, "invalid_request")


def test_no_file_outside_the_index_is_ever_served(server, client, rows):
    secrets = [b"root:", b"[project]", b"from __future__", b"import "]
    paths = [
        "/static/../pyproject.toml",
        "/static/../../pyproject.toml",
        "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%2fapp.py",
        "/static/../app.py",
        "/docs-assets/../../../../../etc/passwd",
        "/v1/images/../../../../etc/passwd",
        "/v1/images/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/v1/images/%2e%2e%2fservice%2fapp.py/thumbnail",
        "/v1/images/1/../../../../etc/passwd",
        "//etc/passwd",
        "/..%2f..%2fetc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
    ]
    for path in paths:
        connection = http.client.HTTPConnection(LOOPBACK, server.port, timeout=30)
        connection.request("GET", path)  # sent as written: no client-side normalisation
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status in (400, 404, 422), (path, response.status)
        assert not any(secret in body for secret in secrets), path
    jpeg = Path(rows[0]["image"]).read_bytes()
    response = upload(client, "../../../../etc/passwd", jpeg, "image/jpeg")
    assert response.status_code == 200  # the client's file name is never used as a path


# -- metrics and micro-batching --------------------------------------------------------------------


def test_metrics_count_requests_latencies_and_index_size(client):
    client.get("/v1/images/12345")
    text = client.get("/metrics").text
    assert metric(text, "convirt_index_images") == 30
    assert metric(text, "convirt_http_requests_total", route="/v1/search/text", status="200") > 0
    assert metric(text, "convirt_http_requests_total", route="/v1/images/{image_id}", status="404")
    assert metric(text, "convirt_http_request_seconds_count", route="/v1/search/image") > 0
    assert metric(text, "convirt_http_requests_total", route="/v1/search/image", status="413") > 0
    assert metric(text, "convirt_batch_size_count", kind="text") > 0
    assert metric(text, "process_resident_memory_bytes") > 0
    # ids never become labels (a sample's value may hold the digits: 0.12345006...)
    assert not re.search(r"\{[^}]*12345[^}]*\}", text), "an image id became a metric label"


def test_search_responses_time_their_stages_and_metrics_have_the_stage_histograms(
    client, rows, ids_by_path
):
    text = search_text(client, rows[0]["text"], filters={"modality": ["XR", "CT", "MR"]})
    image = upload(client, "scan.jpg", Path(rows[1]["image"]).read_bytes(), "image/jpeg")
    image_id = ids_by_path[rows[2]["image"]]
    similar = client.get(f"/v1/images/{image_id}/similar", params={"k": 3})
    refine = client.post(
        "/v1/search/refine", json={"text": rows[0]["text"], "liked": [str(image_id)]}
    )
    expected = {
        "text": (text, {"queue", "encode", "filter", "faiss", "grouping", "describe"}),
        "image": (image, {"decode", "queue", "encode", "faiss", "grouping", "describe"}),
        "similar": (similar, {"faiss", "grouping", "describe"}),
        "refine": (refine, {"queue", "encode", "faiss", "grouping", "describe"}),
    }
    for kind, (response, stages) in expected.items():
        assert response.status_code == 200, (kind, response.text)
        body = response.json()
        timings = body["timings"]
        assert stages <= set(timings), (kind, timings)
        assert all(ms >= 0 for ms in timings.values())
        assert sum(timings.values()) <= body["took_ms"] + 1, (kind, timings, body["took_ms"])
    metrics = client.get("/metrics").text
    for stage in ("queue", "encode", "decode", "filter", "faiss", "grouping", "describe"):
        assert metric(metrics, "convirt_search_stage_seconds_count", stage=stage) > 0, stage


def test_concurrent_text_queries_are_micro_batched_with_unchanged_results(client, rows):
    texts = [r["text"] for r in rows[:24]]
    alone = {text: search_text(client, text).json()["results"] for text in texts[:4]}
    before = client.get("/metrics").text
    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(lambda text: search_text(client, text), texts))
    after = client.get("/metrics").text
    assert all(r.status_code == 200 for r in responses)
    queries = metric(after, "convirt_batch_size_sum", kind="text") - metric(
        before, "convirt_batch_size_sum", kind="text"
    )
    calls = metric(after, "convirt_batch_size_count", kind="text") - metric(
        before, "convirt_batch_size_count", kind="text"
    )
    assert queries == len(texts)
    assert calls < len(texts) / 2, f"{len(texts)} queries in {calls} encoder calls"
    for text, response in zip(texts, responses, strict=False):
        if text in alone:
            served = response.json()["results"]
            assert [r["id"] for r in served] == [r["id"] for r in alone[text]]
            np.testing.assert_allclose(
                [r["score"] for r in served], [r["score"] for r in alone[text]], atol=1e-5
            )


def test_concurrent_uploads_are_embedded_at_most_max_image_batch_at_a_time(client, rows):
    uploads = [Path(r["image"]).read_bytes() for r in rows[:10]]
    before = client.get("/metrics").text
    with ThreadPoolExecutor(len(uploads)) as pool:
        responses = list(
            pool.map(lambda data: upload(client, "scan.jpg", data, "image/jpeg"), uploads)
        )
    after = client.get("/metrics").text
    assert all(r.status_code == 200 for r in responses)

    def grown(name: str, **labels: str) -> float:
        return metric(after, name, kind="image", **labels) - metric(
            before, name, kind="image", **labels
        )

    calls = grown("convirt_batch_size_count")
    assert grown("convirt_batch_size_sum") == len(uploads)
    assert calls >= len(uploads) / IMAGE_BATCH
    assert grown("convirt_batch_size_bucket", le=f"{IMAGE_BATCH:.1f}") == calls  # none larger


# -- the web page ----------------------------------------------------------------------------------


def test_web_page_text_search_upload_and_similar_cases(server, client, rows, ids_by_path):
    with browser_page() as (_browser, page, expect):
        page.goto(server.url + "/")
        expect(page.locator("#index-status")).to_contain_text("30 images")

        page.fill("#query", rows[0]["text"])
        page.fill("#k", "8")
        page.click("#search-button")
        cards = page.locator("#grid .card")
        expect(cards).to_have_count(8)
        expect(page.locator("#results-title")).to_contain_text("Images for")
        expect(cards.first.locator(".score")).to_have_text(re.compile(r"^-?\d\.\d{3}$"))
        page.wait_for_function(
            "[...document.querySelectorAll('#grid .thumb')].every(i => i.complete && i.naturalWidth > 0)"
        )
        assert any(text.strip() for text in page.locator("#grid .report").all_inner_texts())

        image = Path(rows[4]["image"])
        page.set_input_files("#file-input", str(image))
        expect(page.locator("#results-title")).to_contain_text(f"Cases similar to {image.name}")
        expect(cards.first).to_have_attribute("data-id", str(ids_by_path[str(image)]))

        clicked = cards.nth(1).get_attribute("data-id")
        cards.nth(1).locator(".similar").click()
        expect(page.locator("#results-title")).to_contain_text("Cases similar to")
        expect(page.locator(f"#grid .card[data-id='{clicked}']")).to_have_count(0)
        expected = result_ids(client.get(f"/v1/images/{clicked}/similar", params={"k": 8}))
        expect(cards).to_have_count(8)
        assert [int(i) for i in cards.evaluate_all("cs => cs.map(c => c.dataset.id)")] == expected

        page.click("#back-button")
        expect(page.locator("#results-title")).to_contain_text(f"Cases similar to {image.name}")
        page.fill("#query", "   ")
        page.click("#search-button")
        expect(page.locator("#message")).to_contain_text("Type a report sentence")


# -- admin: reload ---------------------------------------------------------------------------------


def test_reload_requires_the_api_key(client):
    error_of(client.post("/v1/admin/reload"), 401, "unauthorized")
    error_of(client.post("/v1/admin/reload", headers={"X-API-Key": "wrong"}), 401)
    error_of(client.post("/v1/admin/reload", headers={"X-API-Key": ""}), 401)
    response = client.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})
    assert response.status_code == 200 and response.json()["reloaded"] is False


def test_reload_while_queries_run_drops_nothing(
    client, server, bundle, index_root, datasets, rows, ids_by_path, tmp_path
):
    old_version = client.get("/readyz").json()["index_version"]
    jpeg = Path(rows[1]["image"]).read_bytes()
    similar_id = ids_by_path[rows[6]["image"]]
    queries = [
        lambda session: search_text(session, rows[8]["text"]),
        lambda session: upload(session, "q.jpg", jpeg, "image/jpeg"),
        lambda session: session.get(f"/v1/images/{similar_id}/similar"),
        lambda session: session.get(f"/v1/images/{similar_id}/thumbnail"),
    ]
    outcomes: list[tuple[int, str | None]] = []
    failures: list[str] = []
    stop = threading.Event()

    def fire(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as session:
            n = worker
            while not stop.is_set():
                try:
                    response = queries[n % len(queries)](session)
                    version = response.headers.get("content-type", "").startswith(
                        "application/json"
                    ) and response.json().get("index_version")
                    outcomes.append((response.status_code, version or None))
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                n += 1

    new_rows = medpix_rows(datasets, "dev", 4)
    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(fire, n) for n in range(4)]
        summary = add(
            index_root,
            bundle,
            read_manifest(write_manifest(tmp_path / "new.csv", new_rows)),
            INDEX_OPTIONS,
        )
        assert summary.version != old_version
        seen_before = len(outcomes)
        reload = client.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})
        time.sleep(1.5)
        stop.set()
        for worker in workers:
            worker.result()
    assert reload.status_code == 200, reload.text
    body = reload.json()
    assert body["reloaded"] is True
    assert (body["previous_version"], body["index_version"]) == (old_version, summary.version)
    assert body["images"] == 34
    assert failures == []
    assert len(outcomes) > seen_before > 0
    versions = {version for _, version in outcomes if version}
    assert versions == {old_version, summary.version}
    ready = client.get("/readyz").json()
    assert (ready["index_version"], ready["images"]) == (summary.version, 34)
    assert metric(client.get("/metrics").text, "convirt_index_images") == 34
    added = Path(new_rows[0]["image"])
    response = upload(client, added.name, added.read_bytes(), "image/jpeg")
    new_id = result_ids(response)[0]
    assert response.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert client.get(f"/v1/images/{new_id}").content == added.read_bytes()


def test_a_version_built_with_another_model_is_refused_and_the_old_one_kept(
    client, small_model_config, index_root, rows, tmp_path
):
    serving = client.get("/readyz").json()["index_version"]
    other = make_bundle(small_model_config, 1, tmp_path / "other")
    manifest = write_manifest(tmp_path / "other.csv", rows[:2])
    build(index_root, other, read_manifest(manifest), INDEX_OPTIONS)
    try:
        error = error_of(
            client.post("/v1/admin/reload", headers={"X-API-Key": API_KEY}), 409, "model_mismatch"
        )
        assert read_bundle_info(other)["fingerprint"] in error["message"]
        assert client.get("/readyz").json()["index_version"] == serving
        assert len(result_ids(search_text(client, rows[0]["text"]))) == 5
    finally:
        layout.switch_current(index_root, serving)


def test_the_service_polls_for_new_versions_when_asked(
    bundle_dir, bundle, index_root, datasets, tmp_path
):
    root = shutil.copytree(index_root, tmp_path / "root")
    layout.switch_current(root, layout.list_versions(root)[0])  # the 30-image version
    settings = server_settings(bundle_dir, root, CONVIRT_RELOAD_POLL_SECONDS=0.2)
    with ServerProcess(settings) as process, httpx.Client(base_url=process.url) as session:
        assert session.get("/readyz").json()["images"] == 30
        rows = medpix_rows(datasets, "dev", 2)
        summary = add(
            root, bundle, read_manifest(write_manifest(tmp_path / "m.csv", rows)), INDEX_OPTIONS
        )
        deadline = time.monotonic() + 30
        while session.get("/readyz").json()["index_version"] != summary.version:
            assert time.monotonic() < deadline, "the new version was not picked up"
            time.sleep(0.1)
        assert session.get("/readyz").json()["images"] == 32
        error_of(session.post("/v1/admin/reload", headers={"X-API-Key": "x"}), 403)


def test_startup_refuses_a_model_the_index_was_not_built_with(
    small_model_config, index_root, bundle, tmp_path, capsys
):
    other = make_bundle(small_model_config, 2, tmp_path / "other")
    code = cli.main(["--model", str(other), "--index-root", str(index_root), "--port", "0"])
    assert code == 2
    message = capsys.readouterr().err
    assert bundle.fingerprint in message and read_bundle_info(other)["fingerprint"] in message
    assert "rebuild the index" in message
    assert cli.main(["--index-root", str(index_root)]) == 2
    assert "CONVIRT_MODEL" in capsys.readouterr().err
    assert cli.main(["--model", str(other), "--index-root", str(tmp_path / "none")]) == 2
    assert "no index" in capsys.readouterr().err
    assert cli.main(["--port", "99999"]) == 2
    assert "CONVIRT_PORT" in capsys.readouterr().err


# -- the API fuzzed from its own OpenAPI description ------------------------------------------------


def test_fuzzed_requests_never_get_a_server_error(server, tmp_path):
    """Schemathesis generates requests for every operation from /openapi.json (valid and invalid
    inputs) and checks that none gets a 5xx. The server fixture also fails the module if the
    server logged a traceback meanwhile."""
    schema_url = f"{server.url}/openapi.json"
    report = tmp_path / "fuzz.xml"
    # The CLI rather than the pytest plugin: the plugin does not run under pytest 9.
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        schema_url,
        "--checks=not_a_server_error",
        "--max-examples=100",
        f"--header=X-API-Key: {API_KEY}",  # the admin operation too, past its 401
        "--seed=1",
        "--workers=1",
        "--request-timeout=60",
        "--report=junit",
        f"--report-junit-path={report}",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    tested = {case.get("name") for case in ElementTree.parse(report).iter("testcase")}
    operations = httpx.get(schema_url).json()["paths"]
    assert len(tested) >= sum(len(methods) for methods in operations.values()), tested
