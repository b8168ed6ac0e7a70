"""A slow PACS must not freeze the service (issue 21, finding 1), against a real `convirt serve`.

The probe: 45 concurrent views of one PACS image while the PACS sent a byte every 5 s froze text
search, thumbnails and other images for over 40 s (the fetches held the shared worker pool that
also writes the audit log), and /healthz said 200 throughout. Here a real index of medpix images
has 16 of its rows rewritten to name instances of a fake DICOMweb server in a thread
(tests/trickling_pacs.py) that trickles a byte a second, and the server runs with an audit log and a
3 s PACS deadline. 45 views of one image and one view each of 15 others come at once; searches,
thumbnails and a local image must answer as fast as before, the views must end promptly with a
504/503, /readyz must name the PACS, and once it recovers the image must be served.
"""

from __future__ import annotations

import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import INDEX_OPTIONS, server_settings, serving
from test_service import medpix_rows, metric, write_manifest
from trickling_pacs import FakePacs, point_rows_at

from index.read.store import open_current
from index.sources.manifest import read_manifest
from index.write.build import build

THREADS, QUEUE, DEADLINE_S, RETRY_S = 4, 8, 3.0, 2.0
HOT_VIEWS = 45  # of one image
OTHER_PACS_IMAGES = 15  # one view each: 16 images, past the 4 threads + 8 waiting
LOCAL_IMAGES = 3
SLACK_S = 2.0  # scheduling slack on two shared cores
PROMPT_S = DEADLINE_S / 2  # "at once": well before a deadline could have passed
CLIENT_TIMEOUT_S = 10.0  # what a search may take before the test calls the service frozen
TEXT = "Axial CT of the abdomen with a mass in the liver"


@pytest.fixture(scope="module")
def pristine_root(tmp_path_factory, bundle_dir, datasets) -> Path:
    folder = tmp_path_factory.mktemp("slow-pacs")
    images = 1 + OTHER_PACS_IMAGES + LOCAL_IMAGES
    manifest = write_manifest(folder / "m.csv", medpix_rows(datasets, "train", images))
    options = replace(INDEX_OPTIONS, workers=1)  # decoded here: no process pool to start
    build(folder / "root", bundle_dir, read_manifest(manifest), options)
    return folder / "root"


def timed(call) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = call()
    return time.perf_counter() - started, response


def p99(seconds: list[float]) -> float:
    return statistics.quantiles(seconds, n=100, method="inclusive")[98]


def round_of_requests(client: httpx.Client, local_id: int, thumb_id: int) -> dict[str, float]:
    """A text search, a thumbnail of a PACS image and a local image: the seconds of each."""
    took = {}
    for name, call in (
        ("text", lambda: client.post("/v1/search/text", json={"text": TEXT, "k": 5})),
        ("thumbnail", lambda: client.get(f"/v1/images/{thumb_id}/thumbnail")),
        ("local image", lambda: client.get(f"/v1/images/{local_id}")),
    ):
        seconds, response = timed(call)
        assert response.status_code == 200, (name, response.text)
        took[name] = seconds
    return took


def view(client: httpx.Client, image_id: int) -> tuple[float, int, str]:
    seconds, response = timed(lambda: client.get(f"/v1/images/{image_id}"))
    code = response.json()["error"]["code"] if response.status_code >= 400 else ""
    return seconds, response.status_code, code


def test_slow_pacs_does_not_freeze_search(pristine_root, bundle_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(pristine_root, root)
    with open_current(root) as store:
        ids = sorted(store.ids.tolist())
    pacs_ids, local_ids = ids[: 1 + OTHER_PACS_IMAGES], ids[1 + OTHER_PACS_IMAGES :]
    hot = pacs_ids[0]
    with FakePacs(interval=1.0) as pacs:
        served = point_rows_at(root, pacs_ids, pacs)
        settings = server_settings(
            bundle_dir,
            root,
            CONVIRT_AUDIT_LOG=tmp_path / "audit.jsonl",
            CONVIRT_PACS_THREADS=THREADS,
            CONVIRT_PACS_QUEUE=QUEUE,
            CONVIRT_PACS_DEADLINE_S=DEADLINE_S,
            CONVIRT_PACS_RETRY_S=RETRY_S,
        )
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        with (
            serving(settings) as server,
            httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client,
        ):
            try:
                run_slow_pacs(client, pacs, hot, pacs_ids, local_ids, served)
            finally:
                pacs.recover()  # ends the trickles, so the server can stop


def run_slow_pacs(client, pacs, hot, pacs_ids, local_ids, served) -> None:
    for _ in range(3):  # warm up
        round_of_requests(client, local_ids[0], pacs_ids[1])
    quiet = [round_of_requests(client, local_ids[0], pacs_ids[1]) for _ in range(10)]

    # 45 views of one image, then one view each of 15 others, all at once
    with ThreadPoolExecutor(max_workers=HOT_VIEWS + OTHER_PACS_IMAGES) as viewers:
        hot_views = [viewers.submit(view, client, hot) for _ in range(HOT_VIEWS)]
        other_views = [viewers.submit(view, client, i) for i in pacs_ids[1:]]
        during = []
        while not all(v.done() for v in hot_views + other_views):
            during.append(round_of_requests(client, local_ids[1], pacs_ids[2]))
        hot_results = [v.result() for v in hot_views]
        other_results = [v.result() for v in other_views]

    # the service answered everything else as before, while the PACS hung
    for name in ("text", "thumbnail", "local image"):
        before = [r[name] for r in quiet]
        meanwhile = [r[name] for r in during]
        assert len(meanwhile) >= 3, during
        assert p99(meanwhile) <= max(2 * p99(before), 1.0), (name, before, meanwhile)

    # the views ended with a clear 504/503, within the deadline, and each image was asked once
    every = hot_results + other_results
    assert {code for _, _, code in every} <= {"pacs_timeout", "pacs_busy", "pacs_unavailable"}
    assert max(seconds for seconds, _, _ in every) <= DEADLINE_S + SLACK_S, every
    assert {(status, code) for _, status, code in hot_results} == {(504, "pacs_timeout")}
    assert any(code == "pacs_busy" for _, _, code in other_results), other_results
    assert all(s < PROMPT_S for s, _, code in other_results if code == "pacs_busy"), other_results
    # one fetch per image, at most as many as the PACS pool runs and queues: no other thread
    assert max(pacs.requests.values()) == 1 and sum(pacs.requests.values()) <= THREADS + QUEUE
    joined = metric(client.get("/metrics").text, "convirt_pacs_fetches_total", outcome="joined")
    assert joined >= HOT_VIEWS - 1

    # a PACS that just failed is not waited on again: views of it are refused at once
    seconds, status, code = view(client, hot)
    assert (status, code) == (503, "pacs_unavailable") and seconds < PROMPT_S
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    section = ready.json()["pacs"]
    assert section["status"] == "degraded" and section["busy"] <= THREADS
    [server] = section["servers"]
    assert server["url"] == pacs.url and server["status"] == "unreachable"
    assert f"within {DEADLINE_S:g} s" in server["last_error"] and server["last_error_at"]

    # once the PACS answers again, so does everything, the image included
    pacs.recover()
    time.sleep(RETRY_S)
    seconds, response = timed(lambda: client.post("/v1/search/text", json={"text": TEXT}))
    assert response.status_code == 200
    assert seconds <= max(2 * p99([r["text"] for r in quiet]), 1.0)
    image = client.get(f"/v1/images/{hot}")
    assert image.status_code == 200, image.text
    assert image.content == served[hot]
    assert image.headers["content-type"] == "application/dicom"
    assert client.get("/readyz").json()["pacs"]["status"] == "ok"
