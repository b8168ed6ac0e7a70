"""Do heat-maps starve text queries? Text latency beside 0 / 4 / 8 clients asking GET /v1/explain.

A heat-map embeds 50 occluded copies of an image: half a second to a second of a CPU. Issue 21
(finding 4) measured, on the 2-core box, 4 text clients at p50 21 ms alone, 3.6 s beside 4
explain clients and 7.1 s beside 8, when heat-maps ran on the model thread that text queries
wait for. They now run in their own worker (CONVIRT_EXPLAIN_WORKER: a niced process by default),
one at a time, behind a bounded queue (service.model.explainer).

One run: start a real `convirt serve` (the demo model and index when runs/ has them, else an
untrained bundle of the default config and an index of --images medpix images), then per level
run --text-clients clients sending POST /v1/search/text back to back for --duration seconds beside
N explain clients, each asking for the map of another (image, caption) pair as soon as the last
one is answered (every pair distinct, so the server's cache never answers). An explain refused as
busy (503 + Retry-After) or rate-limited (429) waits --refused-pause seconds before the next.
Prints JSON: per level text p50/p99, explains answered and refused, then p99 at 4 explain clients
over p99 at 0, whose target is <= 2. --int8 repeats it with CONVIRT_QUANTIZE=int8 (quantised into
a copy of the bundle when it has no int8/ yet). The load generator (httpx, in this process) shares
the machine with the server.

    python bench/explain_contention.py                              # demo model and index
    python bench/explain_contention.py --duration 20 --int8         # the figures of the docs
    python bench/explain_contention.py --explain-worker thread      # the worker as a thread
    python bench/explain_contention.py --model X --index ROOT --levels 0,4
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import Latencies, percentiles_ms, untrained_bundle
from serving import ServerProcess

from convirt.bundle import load_bundle
from convirt.paths import data_root
from convirt.sentences import report_sentences
from index.sources.manifest import read_manifest
from index.write.build import Options, build

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "runs" / "demo-cpu" / "bundle"
DEMO_INDEX = REPO / "runs" / "demo-index-cpu"
QUERY_TEXTS = 64
EXPLAINED_IMAGES = 40
REFUSED = (429, 503)


@dataclass
class Tally(Latencies):
    refused: int = 0  # 429 or 503: turned away, not failed

    def summary(self) -> dict:
        return {
            "answered": len(self.latencies),
            "refused": self.refused,
            "errors": self.errors,
            **percentiles_ms(self.latencies),
        }


def medpix_rows(count: int) -> list[dict[str, str]]:
    source = data_root() / "medpix" / "manifest.csv"
    if not source.is_file():
        raise SystemExit(f"no medpix manifest under {data_root()}: set CONVIRT_DATA_ROOT")
    with open(source, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["text"].strip()][:count]
    return [{**r, "image": str(source.parent / r["image"])} for r in rows]


def query_texts(count: int) -> list[str]:
    """The first imaging sentence of each medpix caption: what a user would type."""
    texts = []
    for row in medpix_rows(count * 2):
        sentences = report_sentences(row["text"], "imaging")
        if sentences:
            texts.append(sentences[0])
    return texts[:count]


def small_index(folder: Path, model: Path, images: int) -> Path:
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "modality"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(medpix_rows(images))
    build(folder / "index", load_bundle(model), read_manifest(manifest), Options(progress=False))
    return folder / "index"


def int8_copy(model: Path, folder: Path) -> Path:
    """The bundle itself when it has an int8 copy, else a copy that the server quantises."""
    if (model / "int8").is_dir():
        return model
    shutil.copytree(model, folder / "bundle-int8")
    return folder / "bundle-int8"


async def explained_ids(client: httpx.AsyncClient, texts: list[str]) -> list[str]:
    ids: list[str] = []
    for text in texts[:8]:
        body = {"text": text, "k": 10, "group_by": "none", "mode": "image"}
        response = await client.post("/v1/search/text", json=body)
        response.raise_for_status()
        ids += [r["id"] for r in response.json()["results"] if r["id"] not in ids]
    return ids[:EXPLAINED_IMAGES]


async def level(
    url: str, texts: list[str], ids: list[str], explainers: int, args: argparse.Namespace
) -> dict:
    """args.text_clients text clients for args.duration seconds beside `explainers` explain
    clients (started a second before, so the text clients meet them busy)."""
    text_tally, explain_tally = Tally(), Tally()
    clients = args.text_clients + explainers
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pairs = [(i, t) for t in texts for i in ids]  # every map asked for is a new one
    asked = iter(range(len(pairs) * 1000))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as session:
        stop = asyncio.Event()

        async def text_client(offset: int, measuring: asyncio.Event) -> None:
            n = offset
            while not stop.is_set():
                body = {"text": texts[n % len(texts)], "k": 10}
                started = time.perf_counter()
                try:
                    response = await session.post("/v1/search/text", json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if measuring.is_set() and not stop.is_set():
                    if ok:
                        text_tally.latencies.append(time.perf_counter() - started)
                    else:
                        text_tally.errors += 1
                n += args.text_clients

        async def explain_client() -> None:
            while not stop.is_set():
                image_id, text = pairs[next(asked) % len(pairs)]
                started = time.perf_counter()
                try:
                    response = await session.get(
                        "/v1/explain", params={"image_id": image_id, "text": text}
                    )
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                if status == 200:
                    explain_tally.latencies.append(time.perf_counter() - started)
                elif status in REFUSED:
                    explain_tally.refused += 1
                    await asyncio.sleep(args.refused_pause)
                else:
                    explain_tally.errors += 1

        measuring = asyncio.Event()
        tasks = [asyncio.create_task(explain_client()) for _ in range(explainers)]
        await asyncio.sleep(1.0 if explainers else 0.0)
        tasks += [asyncio.create_task(text_client(i, measuring)) for i in range(args.text_clients)]
        await asyncio.sleep(0.5)  # the text clients' first round trips: connections
        measuring.set()
        await asyncio.sleep(args.duration)
        stop.set()
        # the text clients finish their last query; explains in flight are abandoned
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(2.0)  # abandoned heat-maps run out before the next level
    return {"text": text_tally.summary(), "explain": explain_tally.summary()}


def worker_peak_rss(server_pid: int) -> int | None:
    """Peak RSS (VmHWM) of the server's heat-map worker processes (Linux), None without one."""
    total = 0
    for task in Path(f"/proc/{server_pid}/task").glob("*"):
        try:
            for child in (task / "children").read_text().split():
                proc = Path(f"/proc/{child}")
                if b"spawn_main" not in (proc / "cmdline").read_bytes():
                    continue
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue  # a thread or a child gone meanwhile
    return total or None


def serve(settings: dict, texts: list[str], args: argparse.Namespace) -> dict:
    with ServerProcess(settings) as server:
        ready = httpx.get(f"{server.url}/readyz", timeout=30).json()

        async def run() -> dict:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                ids = await explained_ids(client, texts)
                await client.get("/v1/explain", params={"image_id": ids[0], "text": "warm up"})
            levels = {}
            for explainers in [int(n) for n in args.levels.split(",")]:
                levels[str(explainers)] = await level(server.url, texts, ids, explainers, args)
                print(f"  {explainers} explain clients: {levels[str(explainers)]}", file=sys.stderr)
            return levels

        levels = asyncio.run(run())
        peak = server.peak_rss_bytes()
        worker = worker_peak_rss(server.process.pid) if server.process else None
    out = {
        "query_encoder": ready.get("query_encoder"),
        "levels": levels,
        "server_peak_rss_mb": round(peak / 2**20, 1) if peak else None,
        "explain_worker_peak_rss_mb": round(worker / 2**20, 1) if worker else None,
    }
    base, busy = levels.get("0"), levels.get("4")
    if base and busy and base["text"]["p99_ms"] and busy["text"]["p99_ms"]:
        out["text_p99_4_over_0"] = round(busy["text"]["p99_ms"] / base["text"]["p99_ms"], 2)
        out["target"] = "<= 2"
    return out


def table(paths: dict[str, dict]) -> str:
    lines = [
        "| query path | explain clients | text p50 ms | text p99 ms | explains answered / refused |",
        "|---|---|---|---|---|",
    ]
    for path, served in paths.items():
        for explainers, row in served["levels"].items():
            text, explain = row["text"], row["explain"]
            lines.append(
                f"| {path} | {explainers} | {text['p50_ms']} | {text['p99_ms']} | "
                f"{explain['answered']} / {explain['refused']} |"
            )
        if "text_p99_4_over_0" in served:
            lines.append(f"| {path} | p99 4 / 0 | | {served['text_p99_4_over_0']} | target <= 2 |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle (default: the demo's, else untrained)")
    parser.add_argument("--index", type=Path, help="index root built with --model")
    parser.add_argument("--images", type=int, default=64, help="images to index without --index")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--levels", default="0,4,8", help="explain clients, comma-separated")
    parser.add_argument("--text-clients", type=int, default=4)
    parser.add_argument("--refused-pause", type=float, default=0.25)
    parser.add_argument("--int8", action="store_true", help="also serve CONVIRT_QUANTIZE=int8")
    parser.add_argument(
        "--explain-worker", choices=["process", "thread"], help="CONVIRT_EXPLAIN_WORKER"
    )
    parser.add_argument("--torch-threads", type=int, default=0, help="CONVIRT_TORCH_THREADS")
    args = parser.parse_args()
    load_before = os.getloadavg()
    texts = query_texts(QUERY_TEXTS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or (DEMO_MODEL if DEMO_MODEL.is_dir() else None)
        root = args.index or (DEMO_INDEX if model == DEMO_MODEL and DEMO_INDEX.is_dir() else None)
        model = model or untrained_bundle(tmp / "bundle")
        root = root or small_index(tmp, model, args.images)
        settings = {
            "CONVIRT_MODEL": model,
            "CONVIRT_INDEX_ROOT": root,
            "CONVIRT_TORCH_THREADS": args.torch_threads,
            "CONVIRT_LOG_LEVEL": "warning",
        }
        if args.explain_worker:
            settings["CONVIRT_EXPLAIN_WORKER"] = args.explain_worker
        paths = {"fp32": settings}
        if args.int8:
            paths["int8"] = {
                **settings,
                "CONVIRT_MODEL": int8_copy(model, tmp),
                "CONVIRT_QUANTIZE": "int8",
            }
        served = {}
        for path, env in paths.items():
            print(f"{path}:", file=sys.stderr)
            served[path] = serve(env, texts, args)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs; client and server share them",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "model": str(model),
        "index": str(root),
        "text_clients": args.text_clients,
        "seconds_per_level": args.duration,
        "explain_worker": args.explain_worker or "the server's default",
        "paths": served,
    }
    print(json.dumps(report, indent=2))
    print(table(served), file=sys.stderr)


if __name__ == "__main__":
    main()
