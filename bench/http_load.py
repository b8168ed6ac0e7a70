"""The load generator of the serving benches: an archive's queries (a caption sentence per text
query, a JPEG per image query) sent by N concurrent clients for a fixed time, one level at a time.

Two generators, the same queries and figures (requests, errors, requests/s, p50/p99): `wrk`
(a C program: Debian's `wrk` package), driven by a Lua script that sends pre-built request
bodies in turn, and httpx.AsyncClient, which on a small machine takes much of the CPU it
measures. Used by serve_latency.py (write_archive also by slow_pacs.py).
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import Latencies, percentiles_ms

from convirt.paths import data_root
from convirt.sentences import report_sentences

K = 10
# level kind -> the text queries' `mode` (serve_latency.py --text-modes sets more)
TEXT_MODES: dict[str, str | None] = {"text": None}


@dataclass
class Archive:
    manifest: Path
    texts: list[str]  # query sentences: the first imaging sentence of each caption
    images: list[Path]


@dataclass
class Level(Latencies):
    seconds: float = 0.0  # the level's wall time

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
