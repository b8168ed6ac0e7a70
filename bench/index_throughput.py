"""Index build throughput: `build` (decode threads + model) against the model's forward pass alone.

Both are measured in the same process on the same bundle and batch size:
- build: images/s of the embedding job of a real `index.write.build.build` over the shared archive
  (medpix + covid-cxr JPEGs): read, hash, decode, thumbnail, preprocess in threads, model, staging;
  build_total also counts writing the version (SQLite, .npy, FAISS);
- model: images/s of Embedder.embed_pixels on one preprocessed batch already in memory, measured
  before and after the build and averaged.
ratio = build / model; >= 0.85 means decoding hides behind the model.

    python bench/index_throughput.py --limit 256            # a quick check
    python bench/index_throughput.py --device cuda          # the whole archive on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import add_build_arguments, archive_images, link_archive, untrained_bundle

from convirt.bundle import load_bundle
from convirt.imageio import load_image
from convirt.inference import Embedder
from index.sources.folder import scan_folder
from index.version import read_version
from index.write.build import Options, build


def measure_model(embedder: Embedder, batch: torch.Tensor, images: int) -> float:
    embedder.embed_pixels(batch)  # warm-up
    steps = max(1, math.ceil(images / len(batch)))
    started = time.perf_counter()
    for _ in range(steps):
        embedder.embed_pixels(batch)
    return steps * len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_build_arguments(parser, 0, "first N archive images (0 = all)")
    args = parser.parse_args()
    images = archive_images(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = load_bundle(args.model or untrained_bundle(tmp / "bundle"), args.device)
        embedder = Embedder(bundle, args.device, args.batch_size)
        batch = torch.stack([embedder.preprocess(load_image(p)) for p in images[: args.batch_size]])
        model = [measure_model(embedder, batch, min(len(images), 4 * args.batch_size))]
        options = Options(
            batch_size=args.batch_size, workers=args.workers, device=args.device, progress=False
        )
        started = time.perf_counter()
        summary = build(
            tmp / "index", bundle, scan_folder(link_archive(images, tmp / "a")), options
        )
        total_seconds = time.perf_counter() - started
        model.append(measure_model(embedder, batch, min(len(images), 4 * args.batch_size)))
        info = read_version(summary.directory).info
    model_rate = sum(model) / len(model)
    build_rate = summary.changes["embedded"] / info["embed_seconds"]
    print(
        json.dumps(
            {
                "images": len(images),
                "indexed": summary.count,
                "device": args.device,
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                "image_size": bundle.config.image_size,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "model_images_per_s": round(model_rate, 1),
                "model_runs_images_per_s": [round(rate, 1) for rate in model],
                "build_images_per_s": round(build_rate, 1),
                "build_total_images_per_s": round(summary.count / total_seconds, 1),
                "ratio": round(build_rate / model_rate, 3),
                "target_ratio": 0.85,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
