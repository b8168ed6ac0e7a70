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

Targets (for docs/benchmarks.md; not assertions): text p50 at concurrency 1 within 1.3x of the
in-process time; requests/s at 32 clients >= 3x requests/s at 1; zero errors.
The load generator runs on the same machine as the server: on few cores it competes for CPU.

    python bench/serve_latency.py --duration 3                  # a quick smoke run
    python bench/serve_latency.py --duration 30 --images 512    # figures for the docs
    python bench/serve_latency.py --torch-threads 1             # steadier on a busy machine
    python bench/serve_latency.py --client httpx                # the Python load generator
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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from convirt.bundle import load_bundle, load_tokenizer, save_bundle
from convirt.config import ModelConfig
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.model import build_model
from convirt.paths import data_root
from convirt.sentences import report_sentences
from index.builder import Options, build
from index.sources import read_manifest
from index.store import IndexStore, open_current
from service.process import ServerProcess

K = 10
IN_PROCESS_RUNS = 40


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
        ms = np.array(self.latencies) * 1000
        done = len(self.latencies)
        return {
            "requests": done,
            "errors": self.errors,
            "rps": round(done / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if done else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if done else None,
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


def default_bundle(out: Path) -> Path:
    """The default architecture (224 px Lite0 + MiniLM), untrained heads: the speed is the same."""
    config = ModelConfig()
    save_bundle(build_model(config, seed=0).eval(), load_tokenizer(config), out)
    return out


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


async def drive(url: str, kind: str, clients: int, seconds: float, archive: Archive) -> Level:
    """`clients` concurrent clients sending one query after another for `seconds`."""
    uploads = [(path.name, path.read_bytes()) for path in archive.images[:16]]
    level = Level()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as session:

        async def query(n: int) -> httpx.Response:
            if kind == "text":
                text = archive.texts[n % len(archive.texts)]
                return await session.post("/v1/search/text", json={"text": text, "k": K})
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
    if kind == "text":
        bodies = [json.dumps({"text": text, "k": K}).encode() for text in archive.texts]
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


def drive_wrk(url: str, kind: str, clients: int, seconds: float, archive: Archive) -> dict:
    """One level under wrk: `clients` connections, each sending one query after another."""
    path, content_type, bodies = request_bodies(kind, archive)
    with tempfile.TemporaryDirectory() as tmp:
        for n, body in enumerate(bodies):
            (Path(tmp) / f"body-{n}").write_bytes(body)
        script = Path(tmp) / "queries.lua"
        script.write_text(
            WRK_SCRIPT
            % {"path": path, "content_type": content_type, "count": len(bodies), "folder": tmp}
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
    for kind in ("text", "image"):
        results[kind] = {}
        for clients in levels:
            before = batch_stats(server.url, kind)
            level = drive_level(server.url, kind, clients, seconds, archive)
            after = batch_stats(server.url, kind)
            calls = after[1] - before[1]
            level["mean_batch"] = round((after[0] - before[0]) / calls, 2) if calls else None
            rss = server.rss_bytes()
            level["server_rss_mb"] = round(rss / 2**20, 1) if rss else None
            results[kind][str(clients)] = level
    return results


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
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    levels = [int(n) for n in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = write_archive(tmp, args.images)
        model_dir = args.model or default_bundle(tmp / "bundle")
        bundle = load_bundle(model_dir)
        build(tmp / "index", bundle, read_manifest(archive.manifest), Options(progress=False))
        embedder = Embedder(bundle)
        with open_current(tmp / "index") as store:
            before = time_in_process(embedder, store, archive)
            indexed = store.count
        settings = {
            "CONVIRT_MODEL": model_dir,
            "CONVIRT_INDEX_ROOT": tmp / "index",
            "CONVIRT_BATCH_WINDOW_MS": args.batch_window_ms,
            "CONVIRT_MAX_BATCH": args.max_batch,
            "CONVIRT_MAX_IMAGE_BATCH": args.max_image_batch,
            "CONVIRT_TORCH_THREADS": args.torch_threads,
            "CONVIRT_LOG_LEVEL": "warning",
        }
        with ServerProcess(settings) as server:
            http = load_test(server, archive, levels, args.duration, args.client)
            peak_rss = server.peak_rss_bytes()
        with open_current(tmp / "index") as store:
            after = time_in_process(embedder, store, archive)
    in_process = {kind: mean_of(before[kind], after[kind]) for kind in before}
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        "torch threads; client and server share them",
        "images_indexed": indexed,
        "image_size": bundle.config.image_size,
        "k": K,
        "seconds_per_level": args.duration,
        "client": args.client,
        "batch_window_ms": args.batch_window_ms,
        "max_batch": args.max_batch,
        "max_image_batch": args.max_image_batch,
        "in_process": {**in_process, "runs": {"before": before, "after": after}},
        "http": http,
        "server_peak_rss_mb": round(peak_rss / 2**20, 1) if peak_rss else None,
        "targets": targets(in_process, http, levels),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
