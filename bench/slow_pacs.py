"""Text search while a slow PACS is viewed: the 45-view run of issue 21 (finding 1).

An index of --images medpix images (built with --model, default the demo bundle) has 1 + --others
of its rows rewritten to name instances of a DICOMweb server in this process that trickles one
byte every --interval seconds (tests/trickling_pacs.py; each read within a client's per-read
timeout). `convirt serve` runs with an audit log and the CONVIRT_PACS_* settings given. Then:

1. quiet: --clients threads send text searches back to back for --window seconds;
2. during: --views concurrent GET /v1/images/{id} of one PACS image and one view each of --others
   more start at once, and the same text clients run for --window seconds more;
3. the PACS recovers: the first text search after it is timed, then one view of the image.

Prints JSON: text p50/p99 (and errors, client timeouts) quiet and during, thumbnail and local
image p99, what the views got (status/code counts, slowest), the /readyz PACS section, requests
the PACS saw, the first search after recovery. Target (issue 21): text p99 during within 2x of
quiet. Against the previous commit (its code on PYTHONPATH, this file and
tests/trickling_pacs.py copied beside it) the same run shows the freeze.

    python bench/slow_pacs.py                                   # 45 views, a byte every 5 s
    python bench/slow_pacs.py --window 10 --deadline 5          # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from http_load import write_archive
from serving import ServerProcess

from convirt.bundle import load_bundle
from index.read.store import open_current
from index.sources.manifest import read_manifest
from index.write.build import Options, build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from trickling_pacs import FakePacs, point_rows_at

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "runs" / "demo-cpu" / "bundle"
TEXT = "Axial CT of the abdomen with a mass in the liver"


def summary(seconds: list[float], errors: int) -> dict:
    if not seconds:
        return {"requests": 0, "errors": errors}
    ms = sorted(s * 1000 for s in seconds)
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    return {
        "requests": len(ms),
        "errors": errors,
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(ms[-1], 1),
    }


def drive(client: httpx.Client, clients: int, seconds: float, local: int, thumb: int) -> dict:
    """`clients` threads: a text search, then (the first thread) a thumbnail and a local image,
    back to back for `seconds`. Latencies by kind; a failure or client timeout is an error."""
    took: dict[str, list[float]] = {"text": [], "thumbnail": [], "local_image": []}
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def timed(kind: str, call) -> None:
        started = time.perf_counter()
        try:
            ok = call().status_code == 200
        except httpx.TimeoutException:
            ok = False
        with lock:
            if ok:
                took[kind].append(time.perf_counter() - started)
            else:
                errors[kind] += 1

    def loop(first: bool) -> None:
        while time.monotonic() < end:
            timed("text", lambda: client.post("/v1/search/text", json={"text": TEXT, "k": 10}))
            if first:
                timed("thumbnail", lambda: client.get(f"/v1/images/{thumb}/thumbnail"))
                timed("local_image", lambda: client.get(f"/v1/images/{local}"))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, [n == 0 for n in range(clients)]))
    return {kind: summary(values, errors[kind]) for kind, values in took.items()}


def view(client: httpx.Client, image_id: int) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        response = client.get(f"/v1/images/{image_id}")
        code = str(response.status_code)
        if response.status_code >= 400:
            code += " " + response.json()["error"]["code"]
    except httpx.TimeoutException:
        code = "client timeout"
    return time.perf_counter() - started, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--views", type=int, default=45, help="concurrent views of one image")
    parser.add_argument("--others", type=int, default=15, help="other PACS images, one view each")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between PACS bytes")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=2, help="text search clients")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout, seconds")
    parser.add_argument("--threads", type=int, default=4, help="CONVIRT_PACS_THREADS")
    parser.add_argument("--queue", type=int, default=8, help="CONVIRT_PACS_QUEUE")
    parser.add_argument("--deadline", type=float, default=15.0, help="CONVIRT_PACS_DEADLINE_S")
    parser.add_argument("--retry", type=float, default=5.0, help="CONVIRT_PACS_RETRY_S")
    args = parser.parse_args()
    out: dict = {"settings": vars(args) | {"model": str(args.model)}}
    with tempfile.TemporaryDirectory() as tmp, FakePacs(interval=args.interval) as pacs:
        tmp = Path(tmp)
        root = tmp / "index"
        archive = write_archive(tmp, args.images)
        build(
            root, load_bundle(args.model), read_manifest(archive.manifest), Options(progress=False)
        )
        with open_current(root) as store:
            ids = sorted(store.ids.tolist())
        pacs_ids, local_ids = ids[: 1 + args.others], ids[1 + args.others :]
        point_rows_at(root, pacs_ids, pacs)
        settings = {
            "CONVIRT_MODEL": args.model,
            "CONVIRT_INDEX_ROOT": root,
            "CONVIRT_LOG_LEVEL": "warning",
            "CONVIRT_AUDIT_LOG": tmp / "audit.jsonl",
            "CONVIRT_CACHE_DIR": tmp / "cache",  # nothing fetched by an earlier run
            "CONVIRT_PACS_THREADS": args.threads,
            "CONVIRT_PACS_QUEUE": args.queue,
            "CONVIRT_PACS_DEADLINE_S": args.deadline,
            "CONVIRT_PACS_RETRY_S": args.retry,
        }
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        with (
            ServerProcess(settings) as server,
            httpx.Client(base_url=server.url, timeout=args.timeout, limits=limits) as client,
        ):
            drive(client, args.clients, 3, local_ids[0], pacs_ids[1])  # warm up
            out["quiet"] = drive(client, args.clients, args.window, local_ids[0], pacs_ids[1])
            viewers = ThreadPoolExecutor(args.views + args.others)
            views = [viewers.submit(view, client, pacs_ids[0]) for _ in range(args.views)]
            views += [viewers.submit(view, client, i) for i in pacs_ids[1:]]
            out["during"] = drive(client, args.clients, args.window, local_ids[0], pacs_ids[1])
            out["readyz_pacs"] = client.get("/readyz", timeout=args.timeout).json().get("pacs")
            unfinished = sum(not v.done() for v in views)
            pacs.recover()
            started = time.perf_counter()
            status = client.post("/v1/search/text", json={"text": TEXT}).status_code
            out["first_search_after_recovery_ms"] = round((time.perf_counter() - started) * 1000)
            out["first_search_after_recovery_status"] = status
            done = [v.result() for v in views]
            viewers.shutdown()
            out["views"] = {
                "unfinished_at_end_of_window": unfinished,
                "outcomes": dict(Counter(code for _, code in done)),
                "slowest_s": round(max(s for s, _ in done), 1),
            }
            out["pacs_requests"] = sum(pacs.requests.values())
            time.sleep(args.retry)
            out["view_after_recovery"] = view(client, pacs_ids[0])[1]
            server.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
