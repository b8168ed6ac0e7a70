"""Where a search's time goes: the per-stage breakdown of text, image and filtered queries.

Starts a real `convirt serve` on loopback over an index already built (the demo's by default),
sends each kind of query one at a time (no concurrency: a stage's own time, not a queue's) and
reads the `timings` object of each response (ms per stage: decode, queue, encode, filter, faiss,
reports, grouping, describe; index.read.timings) beside the client's wall time and the
server's took_ms. Prints a Markdown table of the median and p95 of each stage per kind, then
the same as JSON. The audit write is a stage of /metrics only (it happens after the answer is
built): start the server with CONVIRT_AUDIT_LOG to see it there.

Kinds: text (a sentence of an archive caption, POST /v1/search/text, the index's default mode:
hybrid where it holds report sentences), image (an archive JPEG uploaded, POST
/v1/search/image) and filtered (the text queries again, with a filter on the most common
modality and a keyword the report must assert).

    python bench/search_stages.py --queries 40             # the demo index (make demo)
    python bench/search_stages.py --model runs/demo-cpu/bundle --index runs/demo-index-cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

import common  # noqa: F401  (puts tests/ on sys.path: serving.py)
import httpx
import numpy as np
from serving import ServerProcess

from convirt.sentences import report_sentences
from index.read.timings import STAGES

K = 10
KINDS = ("text", "image", "filtered")


def queries(archive: Path, count: int, seed: int) -> tuple[list[str], list[Path]]:
    """`count` caption sentences and `count` images of the archive, drawn with a fixed seed."""
    with open(archive / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["text"].strip()]
    random.Random(seed).shuffle(rows)
    texts = [s[0] for r in rows if (s := report_sentences(r["text"], "imaging")[:1])][:count]
    images = [archive / r["image"] for r in rows if (archive / r["image"]).suffix == ".jpg"]
    return texts, images[:count]


def common_modality(client: httpx.Client) -> str:
    facets = client.get("/v1/facets").json()["facets"]
    modality = next(f for f in facets if f["field"] == "modality")
    return modality["values"][0]["value"]


def run_kind(client: httpx.Client, kind: str, texts: list[str], images: list[Path], modality: str):
    """(timings of each response, client ms, took_ms) of one kind's queries, one at a time."""
    answers = []
    items = images if kind == "image" else texts
    for item in items:
        started = time.perf_counter()
        if kind == "image":
            files = {"file": (item.name, item.read_bytes(), "image/jpeg")}
            response = client.post("/v1/search/image", files=files, data={"k": str(K)})
        else:
            body = {"text": item, "k": K}
            if kind == "filtered":
                body |= {"filters": {"modality": modality}, "must": ["normal"]}
            response = client.post("/v1/search/text", json=body)
        wall = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        answer = response.json()
        answers.append((answer["timings"], wall, answer["took_ms"]))
    return answers


def summary(answers: list) -> dict[str, dict[str, float]]:
    """{stage or took_ms or client: {p50, p95}} in ms; a stage a query skipped counts 0."""
    columns = {stage: [t.get(stage, 0.0) for t, _, _ in answers] for stage in STAGES}
    columns = {s: v for s, v in columns.items() if any(v)}
    columns["took_ms"] = [took for _, _, took in answers]
    columns["client"] = [wall for _, wall, _ in answers]
    return {
        name: {
            "p50": round(statistics.median(values), 2),
            "p95": round(float(np.percentile(values, 95)), 2),
        }
        for name, values in columns.items()
    }


def table(results: dict[str, dict]) -> str:
    rows = [
        name for name in [*STAGES, "took_ms", "client"] if any(name in r for r in results.values())
    ]
    head = "| stage | " + " | ".join(f"{kind} p50 / p95 ms" for kind in results) + " |"
    lines = [head, "|" + "---|" * (len(results) + 1)]
    for name in rows:
        cells = []
        for result in results.values():
            cell = result.get(name)
            cells.append(f"{cell['p50']:.2f} / {cell['p95']:.2f}" if cell else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo-cpu/bundle"))
    parser.add_argument("--index", type=Path, default=Path("runs/demo-index-cpu"))
    parser.add_argument("--archive", type=Path, default=Path("runs/demo-archive"))
    parser.add_argument("--queries", type=int, default=40, help="per kind")
    parser.add_argument("--warmup", type=int, default=3, help="queries per kind not counted")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts, images = queries(args.archive, args.queries + args.warmup, args.seed)
    settings = {
        "CONVIRT_MODEL": args.model,
        "CONVIRT_INDEX_ROOT": args.index,
        "CONVIRT_TORCH_THREADS": args.torch_threads,
        "CONVIRT_LOG_LEVEL": "warning",
    }
    results = {}
    with ServerProcess(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        ready = client.get("/readyz").json()
        modality = common_modality(client)
        for kind in KINDS:
            warm = run_kind(client, kind, texts[: args.warmup], images[: args.warmup], modality)
            assert len(warm) == args.warmup
            counted = run_kind(client, kind, texts[args.warmup :], images[args.warmup :], modality)
            results[kind] = summary(counted)
    print(table(results))
    report = {
        "index_version": ready["index_version"],
        "images": ready["images"],
        "queries_per_kind": args.queries,
        "filter": {"modality": modality, "must": ["normal"]},
        "stages_ms": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
