"""Service latency over loopback HTTP, beside the in-process encode+search time of the same queries.

One run: build an index of shared archive images (medpix, with their captions), time the same
queries in this process (encode + search + metadata, no HTTP), then start `convirt serve` as a
child process and drive it with N concurrent clients for a fixed time per level: text queries
(POST /v1/search/text: a sentence of each archive caption in turn, as a user would type) and
image queries (POST /v1/search/image, JPEG uploads in turn). The load generator (http_load.py)
is `wrk` (a C program: Debian's `wrk` package) when it is installed, else httpx.AsyncClient,
which on a small machine takes much of the CPU it measures; the targets and tables are
serve_tables.py's.
Per level: requests, errors, requests/s, p50/p99 latency, the mean micro-batch size and the
server's RSS after the level; then its peak RSS (VmHWM). The in-process times are measured before
and after the HTTP load, with the server stopped, and averaged. Prints JSON.

Then a lone-query probe: text queries from one client 0.5 s apart (the server idle between
them: wrk's delay(), or the httpx client sleeping), against the same client's back-to-back p50 at
one client; the target is the lone p50 within 1.3x of the back-to-back p50.

Targets (for docs/benchmarks.md; not assertions): text p50 at concurrency 1 within 1.3x of the
in-process time; requests/s at 32 clients >= 3x requests/s at 1; zero errors.
The load generator runs on the same machine as the server: on few cores it competes for CPU.

--text-modes image,hybrid sends the text queries once per ranking mode (the `mode` of POST
/v1/search/text: image, report or hybrid, index.read.hybrid) to the same server, level by level, and
prints the p50/p99 of each beside the first's: the cost of ranking with the reports. --index ROOT
serves an index already built (the demo's) instead of building one of --images medpix images.

--compare serves the fp32 and the int8 query path (CONVIRT_QUANTIZE=none, then int8) in the same
run: same index, queries and load generator, one server after the other, `--rounds` times; it
prints a side-by-side table with the int8/fp32 ratios (medians of each round's ratio) on stderr.
Targets: text requests/s at 32 clients >= 2x fp32's, text p50 at one client <= 0.6x fp32's.

    python bench/serve_latency.py --duration 3                  # a quick smoke run
    python bench/serve_latency.py --duration 30 --images 512    # figures for the docs
    python bench/serve_latency.py --torch-threads 1             # steadier on a busy machine
    python bench/serve_latency.py --client httpx                # the Python load generator
    python bench/serve_latency.py --model runs/demo-cpu/bundle --compare --duration 10
    python bench/serve_latency.py --model runs/demo-cpu/bundle --index runs/demo-index-cpu \
        --text-modes image,hybrid --levels 1,8 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common import untrained_bundle
from http_load import (
    TEXT_MODES,
    Archive,
    K,
    batch_stats,
    drive,
    drive_httpx,
    drive_wrk,
    write_archive,
)
from serve_tables import comparison, mode_table, print_table, targets
from serving import ServerProcess

from convirt.bundle import load_bundle
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.quantize import load_int8
from index.read.store import IndexStore, open_current
from index.sources.manifest import read_manifest
from index.write.build import Options, build

IN_PROCESS_RUNS = 40
IDLE_GAP_S = 0.5
PATHS = {"fp32": "none", "int8": "int8"}  # query path -> CONVIRT_QUANTIZE


def time_in_process(embedder: Embedder, store: IndexStore, archive: Archive) -> dict:
    """Median and p99 ms of encode + search + metadata per query, one query at a time."""

    def text_query(text: str) -> None:
        hits = store.search_text_vectors(embedder.embed_texts([text]).vectors, K)[0]
        store.get_many([hit.id for hit in hits])

    def image_query(data: bytes) -> None:
        pixels = embedder.preprocess(load_image(data))[None]
        encoder, _ = embedder.embed_pixels(pixels)
        hits = store.search_image_vectors(encoder, K)[0]
        store.get_many([hit.id for hit in hits])

    uploads = [path.read_bytes() for path in archive.images[:16]]
    return {
        "text": timed(text_query, archive.texts),
        "image": timed(image_query, uploads),
    }


def mean_of(first: dict, second: dict) -> dict:
    """In-process times before and after the HTTP load, averaged (other load on the machine
    moves them; the two runs show by how much)."""
    return {key: round((first[key] + second[key]) / 2, 2) for key in first}


def timed(run, inputs: list) -> dict:
    for item in inputs[:3]:
        run(item)  # warm-up
    times = []
    for n in range(IN_PROCESS_RUNS):
        started = time.perf_counter()
        run(inputs[n % len(inputs)])
        times.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(float(np.percentile(times, 99)), 2),
    }


def load_test(
    server: ServerProcess, archive: Archive, levels: list[int], seconds: float, client: str
) -> dict:
    drive_level = drive_wrk if client == "wrk" else drive_httpx
    results: dict[str, dict[str, dict]] = {}
    for kind in (*TEXT_MODES, "image"):
        results[kind] = {}
        batches = "text" if kind in TEXT_MODES else kind
        for clients in levels:
            before = batch_stats(server.url, batches)
            level = drive_level(server.url, kind, clients, seconds, archive)
            after = batch_stats(server.url, batches)
            calls = after[1] - before[1]
            level["mean_batch"] = round((after[0] - before[0]) / calls, 2) if calls else None
            rss = server.rss_bytes()
            level["server_rss_mb"] = round(rss / 2**20, 1) if rss else None
            results[kind][str(clients)] = level
    return results


def idle_probe(url: str, archive: Archive, queries: int, client: str, back_to_back: dict) -> dict:
    """Text p50/p99 of lone queries IDLE_GAP_S apart from one client (the server idle between
    them), beside the same client's back-to-back p50 (the one-client level)."""
    time.sleep(2.0)  # the last level's abandoned requests finish first
    seconds = queries * IDLE_GAP_S
    if client == "wrk":
        lone = drive_wrk(url, "text", 1, seconds, archive, gap_s=IDLE_GAP_S)
    else:
        lone = asyncio.run(drive(url, "text", 1, seconds, archive, gap_s=IDLE_GAP_S)).summary()
    return {
        "idle": {key: lone[key] for key in ("requests", "p50_ms", "p99_ms")},
        "back_to_back": {key: back_to_back[key] for key in ("p50_ms", "p99_ms")},
        "idle_over_back_to_back": round(lone["p50_ms"] / back_to_back["p50_ms"], 2),
        "target": 1.3,
    }


def serve(settings: dict, archive: Archive, args: argparse.Namespace) -> dict:
    """One server: the load levels, the lone-query probe, its peak RSS."""
    levels = [int(n) for n in args.levels.split(",")]
    with ServerProcess(settings) as server:
        ready = httpx.get(f"{server.url}/readyz", timeout=30).json()
        http = load_test(server, archive, levels, args.duration, args.client)
        idle = None
        if args.idle_queries and "1" in http["text"]:
            idle = idle_probe(
                server.url, archive, args.idle_queries, args.client, http["text"]["1"]
            )
        peak_rss = server.peak_rss_bytes()
    return {
        "query_encoder": ready.get("query_encoder"),
        "http": http,
        "lone_query": idle,
        "server_peak_rss_mb": round(peak_rss / 2**20, 1) if peak_rss else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="bundle (default: the default config, untrained)"
    )
    parser.add_argument("--images", type=int, default=128, help="archive images to index")
    parser.add_argument(
        "--index", type=Path, help="serve this index root (built with --model) instead"
    )
    parser.add_argument(
        "--text-modes",
        default="",
        help="text query modes, comma-separated (image, report, hybrid); the first is the "
        "baseline of the others' ratios (default: the server's default mode only)",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument(
        "--client",
        choices=["wrk", "httpx"],
        default="wrk" if shutil.which("wrk") else "httpx",
        help="load generator (default: wrk when installed)",
    )
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-image-batch", type=int, default=4)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads of the model, here and in the server (0: torch's default); "
        "1 is steadier on a machine busy with other work",
    )
    parser.add_argument(
        "--quantize",
        choices=sorted(set(PATHS.values())),
        default="none",
        help="the server's query path (CONVIRT_QUANTIZE) without --compare",
    )
    parser.add_argument(
        "--compare", action="store_true", help="serve fp32 then int8 in the same run, side by side"
    )
    parser.add_argument("--rounds", type=int, default=1, help="fp32/int8 rounds with --compare")
    parser.add_argument(
        "--idle-queries",
        type=int,
        default=20,
        help=f"lone text queries {IDLE_GAP_S} s apart after the levels (0: none)",
    )
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    levels = [int(n) for n in args.levels.split(",")]
    modes = [m for m in args.text_modes.split(",") if m]
    if modes:
        TEXT_MODES.clear()
        TEXT_MODES.update({"text": modes[0], **{f"text-{m}": m for m in modes[1:]}})
    paths = PATHS if args.compare else {p: q for p, q in PATHS.items() if q == args.quantize}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = write_archive(tmp, args.images)
        model_dir = args.model or untrained_bundle(tmp / "bundle")
        bundle = load_bundle(model_dir)
        root = args.index or tmp / "index"
        if args.index is None:
            build(root, bundle, read_manifest(archive.manifest), Options(progress=False))
        embedders = {
            path: Embedder(bundle)
            if quantize == "none"
            else Embedder(bundle, text_encoder=load_int8(bundle, build_missing=True))
            for path, quantize in paths.items()
        }
        with open_current(root) as store:
            before = {p: time_in_process(e, store, archive) for p, e in embedders.items()}
            indexed = store.count
        settings = {
            "CONVIRT_MODEL": model_dir,
            "CONVIRT_INDEX_ROOT": root,
            "CONVIRT_BATCH_WINDOW_MS": args.batch_window_ms,
            "CONVIRT_MAX_BATCH": args.max_batch,
            "CONVIRT_MAX_IMAGE_BATCH": args.max_image_batch,
            "CONVIRT_TORCH_THREADS": args.torch_threads,
            "CONVIRT_LOG_LEVEL": "warning",
        }
        rounds = [
            {
                path: serve({**settings, "CONVIRT_QUANTIZE": quantize}, archive, args)
                for path, quantize in paths.items()
            }
            for _ in range(args.rounds if args.compare else 1)
        ]
        with open_current(root) as store:
            after = {p: time_in_process(e, store, archive) for p, e in embedders.items()}
    in_process = {
        path: {kind: mean_of(before[path][kind], after[path][kind]) for kind in before[path]}
        for path in paths
    }
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        "torch threads; client and server share them",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "bundle": str(args.model) if args.model else "default config, untrained",
        "images_indexed": indexed,
        "image_size": bundle.config.image_size,
        "k": K,
        "seconds_per_level": args.duration,
        "client": args.client,
        "batch_window_ms": args.batch_window_ms,
        "max_batch": args.max_batch,
        "max_image_batch": args.max_image_batch,
    }
    if args.compare:
        table = comparison(rounds, levels)
        report |= {
            "in_process": {**in_process, "runs": {"before": before, "after": after}},
            "rounds": rounds,
            "comparison": table,
        }
        print(json.dumps(report, indent=2))
        print_table(table)
        return
    (path,) = paths
    served = rounds[0][path]
    report |= {
        "query_encoder": served["query_encoder"],
        "in_process": {**in_process[path], "runs": {"before": before[path], "after": after[path]}},
        **served,
        "targets": targets(in_process[path], served["http"], levels),
    }
    if len(TEXT_MODES) > 1:
        report["text_modes"] = mode_table(served["http"], levels)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
