"""Heat-maps under a budget (issue 21, finding 4: "/v1/explain starves every text query").

Against real `convirt serve` processes over a real index of medpix images. The heat-map server
uses a 192 px bundle (the `cpu` config's size): a map there takes about half a second of a core,
as on the demo, so eight of them queued on the model thread (as before the fix) kept a text query
waiting for seconds. Another server requires keys, with a small rate limit, and computes
heat-maps in a thread instead of a process.
"""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import error_of, index_of_rows, make_bundle, server_settings, serving

from convirt.bundle import load_bundle
from convirt.config import ModelConfig
from service.access import RateLimiter
from service.explainer import LruCache, query_key

SIDE = 192
IMAGES = 12
EXPLAINS = 8  # at once: more than the default queue (1 computing + 4 waiting) takes
TEXT_BOUND_S = 1.5  # a text query among them; before the fix it waited several seconds


@pytest.fixture(scope="module")
def rows(datasets: Path) -> list[dict[str, str]]:
    """12 medpix images with 12 different captions (a case's images share one)."""
    with open(datasets / "medpix" / "manifest.csv", newline="", encoding="utf-8") as f:
        train = [r for r in csv.DictReader(f) if r["split"] == "train" and r["text"]]
    picked = list({r["text"][:300]: r for r in reversed(train)}.values())[::-1][:IMAGES]
    return [
        {
            "image": str(datasets / "medpix" / r["image"]),
            "text": r["text"],
            "modality": r["modality"],
        }
        for r in picked
    ]


@pytest.fixture(scope="module")
def bundle_192(tmp_path_factory) -> Path:
    config = ModelConfig(image_size=SIDE, max_text_tokens=32)
    return make_bundle(config, 0, tmp_path_factory.mktemp("explain-bundle") / "bundle")


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle_192, rows) -> Iterator:
    folder = tmp_path_factory.mktemp("explain-index")
    root = index_of_rows(folder, load_bundle(bundle_192), rows, ["image", "text", "modality"])
    with serving(server_settings(bundle_192, root)) as process:
        yield process


@pytest.fixture(scope="module")
def ids(server) -> list[str]:
    body = {"text": "chest", "k": IMAGES, "group_by": "none", "mode": "image"}
    found = httpx.post(f"{server.url}/v1/search/text", json=body, timeout=60).json()["results"]
    assert len(found) == IMAGES
    ids = [r["id"] for r in found]
    warm = explain(server.url, ids[0], "warm up")
    assert warm.status_code == 200, warm.text  # the worker started, as on a server in use
    return ids


def texts_of(rows: list[dict[str, str]]) -> list[str]:
    return [r["text"][:300] for r in rows]


def explain(url: str, image_id: str, text: str, **headers: str) -> httpx.Response:
    params = {"image_id": image_id, "text": text}
    return httpx.get(f"{url}/v1/explain", params=params, headers=headers, timeout=120)


def explain_at_once(url: str, pairs: list[tuple[str, str]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(pairs)) as pool:
        return list(pool.map(lambda pair: explain(url, *pair), pairs))


def text_query_seconds(url: str, text: str) -> float:
    started = time.perf_counter()
    found = httpx.post(f"{url}/v1/search/text", json={"text": text, "k": 5}, timeout=120)
    assert found.status_code == 200, found.text
    return time.perf_counter() - started


def test_explain_does_not_starve_text_queries(server, ids, rows):
    """Eight heat-maps asked for at once, then text queries while they are computed. Before the
    fix the maps queued on the one model thread and the first text query waited behind all of
    them: ~4 s here on an idle machine, as long as the maps took on a busy one. Now each text
    query answers in well under half the time the maps take, and within 1.5 s plus three times
    its time alone, measured just before (the machine may be busy with other work; the first
    one may wait for the maps' own queries to be embedded, five text queries' worth)."""
    texts = texts_of(rows)[EXPLAINS : EXPLAINS + 3]
    alone = [text_query_seconds(server.url, text) for text in texts]

    def explain_done(n: int) -> tuple[httpx.Response, float]:
        return explain(server.url, ids[n], texts_of(rows)[n]), time.perf_counter()

    with ThreadPoolExecutor(EXPLAINS) as pool:
        asked = [pool.submit(explain_done, n) for n in range(EXPLAINS)]
        time.sleep(0.5)  # all of them in: computing, waiting, or refused
        started = time.perf_counter()
        waits = [text_query_seconds(server.url, text) for text in texts]
        answered = [future.result() for future in asked]
    computed = [done for response, done in answered if response.status_code == 200]
    assert computed, [response.text for response, _ in answered]
    maps_left = max(computed) - started
    if maps_left > 1.0:  # the maps still had a while to run (a fast machine may be done sooner)
        assert max(waits) < 0.5 * maps_left, (waits, maps_left)
    assert max(waits) < TEXT_BOUND_S + 3 * max(alone), (waits, alone)


def test_a_full_explain_queue_answers_503_at_once_with_retry_after(server, ids, rows):
    """1 map computing and 4 waiting (the defaults) is the most the server takes: the rest are
    refused at once with explain_busy and a Retry-After, instead of waiting ever longer."""
    texts = texts_of(rows)
    pairs = [(ids[n], texts[(n + 1) % IMAGES]) for n in range(EXPLAINS)]  # not asked before
    answered = explain_at_once(server.url, pairs)
    statuses = [r.status_code for r in answered]
    assert set(statuses) <= {200, 503}, [r.text for r in answered]
    # 5 taken and 3 refused when all 8 arrive within the first map (a busy machine may delay one)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for refused in (r for r in answered if r.status_code == 503):
        error = error_of(refused, 503, "explain_busy")
        assert int(refused.headers["Retry-After"]) >= 1
        assert error["details"]["retry_after_seconds"] == int(refused.headers["Retry-After"])
        assert "CONVIRT_EXPLAIN_QUEUE" in error["message"]


def test_a_second_identical_explain_comes_from_the_cache(server, ids, rows):
    text = texts_of(rows)[3]
    first = explain(server.url, ids[9], text)
    assert first.status_code == 200, first.text
    assert first.headers["X-Explain-Cache"] == "miss"
    again = explain(server.url, ids[9], text)
    assert again.status_code == 200 and again.headers["X-Explain-Cache"] == "hit"
    assert again.json()["grid"] == first.json()["grid"]
    assert again.json()["took_ms"] < first.json()["took_ms"] / 5
    other = explain(server.url, ids[9], text + " Left side.")
    assert other.headers["X-Explain-Cache"] == "miss"
    assert other.json()["grid"] != first.json()["grid"]


def worker_pids(server_pid: int) -> list[int]:
    """The server's heat-map worker processes (spawned: `spawn_main` on their command line)."""
    found = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in command:
                found.append(int(child))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_explain_worker_is_a_503_then_replaced(server, ids, rows):
    """The worker killed (the OOM killer, say): the map in flight or the next is a 503
    explain_unavailable, never a hang or a 500, and the one after starts a new worker."""
    assert explain(server.url, ids[10], "warm").status_code == 200
    (pid,) = worker_pids(server.process.pid)
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)
    time.sleep(0.5)
    refused = explain(server.url, ids[10], "after the worker died")
    error_of(refused, 503, "explain_unavailable")
    assert refused.headers["Retry-After"]
    again = explain(server.url, ids[10], "after the worker died")
    assert again.status_code == 200, again.text
    assert worker_pids(server.process.pid) not in ([], [pid])


# -- the rate limit's cost, the thread worker --------------------------------------------------


def add_key(db: Path, name: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "convirt.cli",
            "keys",
            "add",
            "--db",
            str(db),
            "--name",
            name,
            "--role",
            "reader",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_heat_map_costs_more_of_the_rate_limit_than_a_query(tmp_path, bundle_dir, rows):
    """A computed map counts as CONVIRT_EXPLAIN_RATE_COST requests (here 30 of a 40 burst at
    one a second): after one map the key has room for queries and cached maps, not for a second
    map. Before, a key could ask for 40 at once, each ~0.5-0.9 s of the model."""
    root = index_of_rows(tmp_path, load_bundle(bundle_dir), rows, ["image", "text", "modality"])
    db = tmp_path / "keys.sqlite"
    key = add_key(db, "reader")
    settings = server_settings(
        bundle_dir,
        root,
        CONVIRT_AUTH_DB=db,
        CONVIRT_RATE_LIMIT_PER_MINUTE=60,
        CONVIRT_RATE_LIMIT_BURST=40,
        CONVIRT_EXPLAIN_RATE_COST=30,
        CONVIRT_EXPLAIN_WORKER="thread",
    )
    headers = {"X-API-Key": key}
    with (
        serving(settings) as server,
        httpx.Client(base_url=server.url, headers=headers, timeout=60) as client,
    ):
        found = client.post("/v1/search/text", json={"text": "chest", "group_by": "none"})
        image_id = found.json()["results"][0]["id"]
        params = {"image_id": image_id, "text": rows[0]["text"]}
        first = client.get("/v1/explain", params=params)
        assert first.status_code == 200, first.text
        assert np.array(first.json()["grid"]).shape == (8, 8)
        assert client.get("/v1/explain", params=params).headers["X-Explain-Cache"] == "hit"
        second = client.get("/v1/explain", params={**params, "text": "Frontal chest radiograph."})
        error = error_of(second, 429, "rate_limited")
        assert error["details"]["cost"] == 30 and "a heat-map" in error["message"]
        assert int(second.headers["Retry-After"]) >= 10
        after = client.post("/v1/search/text", json={"text": "chest"})
        assert after.status_code == 200, after.text


def test_rate_limiter_charges_a_cost_and_caches_keep_the_latest():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=40, clock=lambda: now[0])
    assert limiter.take("a", 30) == 0
    assert limiter.take("a", 30) == pytest.approx(20.0)  # 10 left, 1 a second
    assert limiter.take("a") == 0  # a plain request still goes
    now[0] += 21.0
    assert limiter.take("a", 30) == 0
    assert limiter.take("b", 1000) == 0  # more than the burst: charged the whole burst
    assert limiter.take("b") == pytest.approx(1.0)
    cache: LruCache[int] = LruCache(2)
    cache.put("x", 1)
    cache.put("y", 2)
    assert cache.get("x") == 1
    cache.put("z", 3)
    assert cache.get("y") is None and cache.get("x") == 1 and cache.get("z") == 3
    assert query_key("a", None) != query_key("b", None) != query_key(None, 4)
    assert re.fullmatch(r"[0-9a-f]{64}", query_key("pleural effusion", None)[1])
