"""Index build throughput: `build` (decode threads + model) against the model's forward pass alone.

Both are measured in the same process on the same bundle and batch size:
- build: images/s of the embedding job of a real `index.builder.build` over the shared archive
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

from convirt.bundle import load_bundle, load_tokenizer, save_bundle
from convirt.config import ModelConfig
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.model import build_model
from convirt.paths import data_root
from index.builder import Options, build
from index.embedding import DEFAULT_WORKERS
from index.sources import scan_folder

DATASETS = ("medpix", "covid-cxr")


def archive_images(limit: int) -> list[Path]:
    images = [p for name in DATASETS for p in sorted((data_root() / name / "images").glob("*.jpg"))]
    if not images:
        raise SystemExit(f"no images under {data_root()}: set CONVIRT_DATA_ROOT")
    return images[:limit] if limit else images


def link_archive(images: list[Path], folder: Path) -> Path:
    """A folder of symlinks (no copies of the data) that `build --images` scans."""
    for image in images:
        target = folder / image.parent.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(image)
    return folder


def measure_model(embedder: Embedder, batch: torch.Tensor, images: int) -> float:
    embedder.embed_pixels(batch)  # warm-up
    steps = max(1, math.ceil(images / len(batch)))
    started = time.perf_counter()
    for _ in range(steps):
        embedder.embed_pixels(batch)
    return steps * len(batch) / (time.perf_counter() - started)


def default_bundle(out: Path) -> Path:
    """The default architecture (224 px Lite0 + MiniLM), untrained heads: the speed is the same."""
    config = ModelConfig()
    save_bundle(build_model(config, seed=0).eval(), load_tokenizer(config), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="bundle (default: the default config, untrained)"
    )
    parser.add_argument("--limit", type=int, default=0, help="first N archive images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    images = archive_images(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = load_bundle(args.model or default_bundle(tmp / "bundle"), args.device)
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
        report = json.loads((summary.directory / "version.json").read_text())
    model_rate = sum(model) / len(model)
    build_rate = summary.changes["embedded"] / report["embed_seconds"]
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
