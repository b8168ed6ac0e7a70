"""Occlusion heat-map latency: convirt.explain.occlusion_map against one plain forward of the image.

For each of a few real medpix dev images (with their captions as text queries), each round times
one plain forward of the preprocessed image (`embed_pixels`, batch of 1: the baseline) and then
one `occlusion_map` of it at each chunk size asked for, interleaved so that all see the same load
on a busy machine; a warm-up round goes first and is not counted. Prints JSON: median and p90 of
each, the ratio of the medians, the torch thread count, the machine and its load average before
and after (other processes on the same cores inflate every figure).

Target (docs, not an assertion): the map of one image at the `cpu` config's size (Lite0, 192 px)
within 1.5 s on the 2-core CPU.

    python bench/explain_latency.py                          # fresh untrained cpu-size bundle
    python bench/explain_latency.py --model runs/demo-cpu/bundle --runs 20
    python bench/explain_latency.py --batch-size 5,10,25,50  # the chunk size, compared
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import untrained_bundle

from convirt.bundle import load_bundle
from convirt.explain import BATCH_SIZE, GRID, PATCH, occlusion_map
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.paths import data_root
from training.config import load_config


def medpix_pairs(count: int) -> list[tuple[Path, str]]:
    source = data_root() / "medpix" / "manifest.csv"
    if not source.is_file():
        raise SystemExit(f"no medpix manifest under {data_root()}: set CONVIRT_DATA_ROOT")
    with open(source, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "dev" and r["text"].strip()]
    return [(source.parent / r["image"], r["text"]) for r in rows[:count]]


def stats(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {
        "median_ms": round(float(np.median(ms)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
    }


def measure(
    embedder: Embedder, inputs: list, runs: int, grid: int, patch: float, batches: list[int]
) -> tuple[list[float], dict[int, list[float]]]:
    """Seconds of the plain forward, and of the map at each chunk size: per round and image one
    plain forward then one map per chunk size, interleaved so all see the same load."""
    plain: list[float] = []
    maps: dict[int, list[float]] = {batch: [] for batch in batches}
    for round_ in range(runs + 1):  # round 0 is the warm-up
        for pixels, query in inputs:
            started = time.perf_counter()
            embedder.embed_pixels(pixels[None])
            if round_:
                plain.append(time.perf_counter() - started)
            for batch in batches:
                started = time.perf_counter()
                occlusion_map(embedder, pixels, query, grid=grid, patch=patch, batch_size=batch)
                if round_:
                    maps[batch].append(time.perf_counter() - started)
    return plain, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a bundle (default: a fresh cpu-size one)")
    parser.add_argument("--images", type=int, default=3, help="medpix dev images")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds over the images")
    parser.add_argument("--grid", type=int, default=GRID)
    parser.add_argument("--patch", type=float, default=PATCH)
    parser.add_argument(
        "--batch-size", default=str(BATCH_SIZE), help="images per forward; a comma list compares"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(
            args.model or untrained_bundle(Path(tmp) / "bundle", load_config("cpu").model)
        )
    embedder = Embedder(bundle)
    pairs = medpix_pairs(args.images)
    queries = embedder.embed_texts([text for _, text in pairs]).vectors
    inputs = [
        (embedder.preprocess(load_image(path)), query)
        for (path, _), query in zip(pairs, queries, strict=True)
    ]
    batches = [int(b) for b in args.batch_size.split(",")]
    plain, maps = measure(embedder, inputs, args.runs, args.grid, args.patch, batches)
    results = [
        {
            "batch_size": batch,
            "map": stats(maps[batch]),
            "ratio_median": round(float(np.median(maps[batch]) / np.median(plain)), 1),
        }
        for batch in batches
    ]
    config = bundle.config
    span = min(args.grid, max(1, round(args.patch * args.grid)))  # the patch side in cells
    summary = {
        "model": str(args.model or "fresh untrained bundle, cpu config"),
        "image_encoder": config.image_encoder,
        "image_size": config.image_size,
        "grid": args.grid,
        "patch": args.patch,
        "occluded_copies": (args.grid - span + 1) ** 2,
        "images": len(inputs),
        "runs": args.runs,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "plain_forward": stats(plain),
        "results": results,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
