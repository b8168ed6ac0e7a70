"""Service latency over loopback HTTP, beside the in-process encode+search time of the same queries.

One run: build an index of shared archive images (medpix, with their captions), time the same
queries in this process (encode + search + metadata, no HTTP), then start `convirt serve` as a
child process and drive it with N concurrent clients for a fixed time per level: text queries
(POST /v1/search/text: a sentence of each archive caption in turn, as a user would type) and image queries (POST /v1/search/image,
JPEG uploads in turn). The load generator is `wrk` (a C program: Debian's `wrk` package) when it
is installed, else httpx.AsyncClient, which on a small machine takes much of the CPU it measures.
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
/v1/search/text: image, report or hybrid, index.hybrid) to the same server, level by level, and
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
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from common import percentiles_ms, untrained_bundle

from convirt.bundle import load_bundle
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.paths import data_root
from convirt.quantize import load_int8
from convirt.sentences import report_sentences
from index.builder import Options, build
from index.sources import read_manifest
from index.store import IndexStore, open_current
from service.process import ServerProcess

K = 10
IN_PROCESS_RUNS = 40
IDLE_GAP_S = 0.5
PATHS = {"fp32": "none", "int8": "int8"}  # query path -> CONVIRT_QUANTIZE
TEXT_MODES: dict[str, str | None] = {"text": None}  # level kind -> the text queries' `mode`


@dataclass
class Archive:
    manifest: Path
    texts: list[str]  # query sentences: the first imaging sentence of each caption
    images: list[Path]


@dataclass
class Level:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        done = len(self.latencies)
        return {
            "requests": done,
            "errors": self.errors,
            "rps": round(done / self.seconds, 1) if self.seconds else 0.0,
            **percentiles_ms(self.latencies, digits=2),
        }


def write_archive(folder: Path, count: int) -> Archive:
    """A manifest of the first `count` medpix images with captions (absolute paths, no copies)."""
    source = data_root() / "medpix" / "manifest.csv"
    if not source.is_file():
        raise SystemExit(f"no medpix manifest under {data_root()}: set CONVIRT_DATA_ROOT")
    with open(source, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["text"].strip()][:count]
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "modality"])
        writer.writeheader()
        for row in rows:
            image = str(source.parent / row["image"])
            writer.writerow({"image": image, "text": row["text"], "modality": row["modality"]})
    images = [source.parent / r["image"] for r in rows]
    sentences = [report_sentences(r["text"], "imaging")[:1] for r in rows]
    return Archive(manifest, [s[0] for s in sentences if s], images)


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


async def drive(
    url: str, kind: str, clients: int, seconds: float, archive: Archive, gap_s: float = 0.0
) -> Level:
    """`clients` concurrent clients sending one query after another for `seconds` (gap_s after
    each answer)."""
    uploads = [(path.name, path.read_bytes()) for path in archive.images[:16]]
    level = Level()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as session:

        async def query(n: int) -> httpx.Response:
            if kind in TEXT_MODES:
                text = archive.texts[n % len(archive.texts)]
                return await session.post("/v1/search/text", json=text_body(kind, text))
            name, data = uploads[n % len(uploads)]
            files = {"file": (name, data, "image/jpeg")}
            return await session.post("/v1/search/image", files=files, data={"k": str(K)})

        for n in range(3):
            await query(n)  # warm-up: connections and the model's first calls

        async def client(offset: int, deadline: float) -> None:
            n = offset
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await query(n)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    level.latencies.append(time.perf_counter() - started)
                else:
                    level.errors += 1
                n += clients
                if gap_s:
                    await asyncio.sleep(gap_s)

        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(i, deadline) for i in range(clients)))
        level.seconds = time.perf_counter() - started
    return level


WRK_SCRIPT = """
local bodies, n = {}, 0
local path, content_type = "%(path)s", "%(content_type)s"
for i = 0, %(count)d - 1 do
  local f = assert(io.open(string.format("%(folder)s/body-%%d", i), "rb"))
  bodies[#bodies + 1] = f:read("*all")
  f:close()
end
%(delay)s
request = function()
  n = n + 1
  local body = bodies[(n %% #bodies) + 1]
  return wrk.format("POST", path, {["Content-Type"] = content_type}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "errors": %%d, "us": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""
BOUNDARY = "convirt-bench-boundary"


def request_bodies(kind: str, archive: Archive) -> tuple[str, str, list[bytes]]:
    """(path, content type, bodies) of the queries one level sends in turn."""
    if kind in TEXT_MODES:
        bodies = [json.dumps(text_body(kind, text)).encode() for text in archive.texts]
        return "/v1/search/text", "application/json", bodies
    bodies = []
    for path in archive.images[:16]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{K}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{path.name}"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        bodies.append(head + path.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode())
    return "/v1/search/image", f"multipart/form-data; boundary={BOUNDARY}", bodies


def text_body(kind: str, text: str) -> dict:
    mode = TEXT_MODES[kind]
    return {"text": text, "k": K, **({"mode": mode} if mode else {})}


def drive_wrk(
    url: str, kind: str, clients: int, seconds: float, archive: Archive, gap_s: float = 0.0
) -> dict:
    """One level under wrk: `clients` connections, each sending one query after another (gap_s
    after each answer: wrk's delay())."""
    path, content_type, bodies = request_bodies(kind, archive)
    with tempfile.TemporaryDirectory() as tmp:
        for n, body in enumerate(bodies):
            (Path(tmp) / f"body-{n}").write_bytes(body)
        script = Path(tmp) / "queries.lua"
        script.write_text(
            WRK_SCRIPT
            % {
                "path": path,
                "content_type": content_type,
                "count": len(bodies),
                "folder": tmp,
                "delay": f"delay = function() return {round(gap_s * 1000)} end" if gap_s else "",
            }
        )
        threads = str(min(clients, 2))
        command = ["wrk", "-t", threads, "-c", str(clients), "-s", str(script), "--timeout", "60s"]
        subprocess.run([*command, "-d", "2s", url], check=True, capture_output=True)  # warm-up
        out = subprocess.run(
            [*command, "-d", f"{max(1, round(seconds))}s", url],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    done = figures["requests"] - figures["errors"]
    return {
        "requests": done,
        "errors": figures["errors"],
        "rps": round(done / (figures["us"] / 1e6), 1),
        "p50_ms": round(figures["p50_us"] / 1000, 2),
        "p99_ms": round(figures["p99_us"] / 1000, 2),
    }


def drive_httpx(url: str, kind: str, clients: int, seconds: float, archive: Archive) -> dict:
    level = asyncio.run(drive(url, kind, clients, seconds, archive))
    return level.summary()


def batch_stats(url: str, kind: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def sample(name: str) -> float:
        match = re.search(rf'^{name}{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return sample("convirt_batch_size_sum"), sample("convirt_batch_size_count")


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


def comparison(rounds: list[dict[str, dict]], levels: list[int]) -> dict:
    """Per figure: fp32's and int8's medians over the rounds, and the median per-round ratio."""
    high, low = str(max(levels)), str(min(levels))
    image_level = "8" if "8" in rounds[0]["fp32"]["http"]["image"] else high
    figures = {
        f"text requests/s, {high} clients": ("http", "text", high, "rps", 2.0, "min"),
        f"text p50 ms, {low} client": ("http", "text", low, "p50_ms", 0.6, "max"),
        f"text p99 ms, {low} client": ("http", "text", low, "p99_ms", None, None),
        f"image requests/s, {image_level} clients": (
            "http",
            "image",
            image_level,
            "rps",
            None,
            None,
        ),
        "lone text query p50 ms (0.5 s apart)": ("lone_query", "idle", None, "p50_ms", None, None),
    }
    out = {}
    for name, (section, kind, level, key, target, sense) in figures.items():

        def value(run: dict, section=section, kind=kind, level=level, key=key) -> float | None:
            part = run[section]
            if part is None:
                return None
            part = part[kind]
            return (part[level] if level else part)[key]

        fp32 = [value(r["fp32"]) for r in rounds]
        int8 = [value(r["int8"]) for r in rounds]
        if None in fp32 or None in int8:
            continue
        row = {
            "fp32": round(statistics.median(fp32), 2),
            "int8": round(statistics.median(int8), 2),
            "int8_over_fp32": round(
                statistics.median(b / a for a, b in zip(fp32, int8, strict=True)), 2
            ),
        }
        if target is not None:
            row["target"] = f"{'>=' if sense == 'min' else '<='} {target}"
        out[name] = row
    for path in PATHS:
        ratios = [
            r[path]["lone_query"]["idle_over_back_to_back"] for r in rounds if r[path]["lone_query"]
        ]
        if ratios:
            out[f"{path}: lone over back-to-back"] = {
                "ratio": round(statistics.median(ratios), 2),
                "target": "<= 1.3",
            }
    return out


def print_table(table: dict) -> None:
    lines = ["| figure | fp32 | int8 | int8 / fp32 | target |", "|---|---|---|---|---|"]
    for name, row in table.items():
        if "ratio" in row:
            lines.append(f"| {name} | | | {row['ratio']} | {row['target']} |")
        else:
            lines.append(
                f"| {name} | {row['fp32']} | {row['int8']} | {row['int8_over_fp32']} | "
                f"{row.get('target', '')} |"
            )
    print("\n".join(lines), file=sys.stderr)


def mode_table(http: dict, levels: list[int]) -> dict:
    """Per text mode and level: p50/p99 and their ratio to the first mode's (printed too)."""
    out, lines = {}, ["| mode | clients | p50 ms | p99 ms | p50 / first's | p99 / first's |"]
    lines.append("|---|---|---|---|---|---|")
    for kind, mode in TEXT_MODES.items():
        for level in map(str, levels):
            row, base = http[kind][level], http["text"][level]
            out.setdefault(mode, {})[level] = {
                "p50_ms": row["p50_ms"],
                "p99_ms": row["p99_ms"],
                "p50_ratio": round(row["p50_ms"] / base["p50_ms"], 2),
                "p99_ratio": round(row["p99_ms"] / base["p99_ms"], 2),
            }
            figures = out[mode][level]
            lines.append(
                f"| {mode} | {level} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{figures['p50_ratio']} | {figures['p99_ratio']} |"
            )
    print("\n".join(lines), file=sys.stderr)
    return out


def targets(in_process: dict, http: dict, levels: list[int]) -> dict:
    low, high = str(min(levels)), str(max(levels))
    text = http["text"]
    return {
        "text_p50_c1_over_in_process": round(text[low]["p50_ms"] / in_process["text"]["p50_ms"], 2),
        "text_p50_c1_over_in_process_target": 1.3,
        f"text_rps_{high}_over_{low}": round(text[high]["rps"] / max(text[low]["rps"], 1e-9), 2),
        f"image_rps_{high}_over_{low}": round(
            http["image"][high]["rps"] / max(http["image"][low]["rps"], 1e-9), 2
        ),
        "rps_ratio_target": 3.0,
        "errors": sum(v["errors"] for kind in http.values() for v in kind.values()),
        "errors_target": 0,
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
