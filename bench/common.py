"""What several benchmarks set up alike: an untrained bundle (a trained one runs at the same
speed) and the shared archive's images. Imported by the bench scripts run as
`python bench/NAME.py` (their folder is first on sys.path)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convirt.bundle import load_tokenizer, save_bundle
from convirt.config import ModelConfig
from convirt.model import build_model
from convirt.paths import data_root
from index.write.embedding import DEFAULT_WORKERS

ARCHIVE_DATASETS = ("medpix", "covid-cxr")
# tests/ holds what the server benches share with the tests: the `convirt serve` harness
# (serving.py) and the fake PACS; importing this module puts it on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def untrained_bundle(out: Path, config: ModelConfig | None = None) -> Path:
    """A bundle of `config`'s architecture (default: 224 px Lite0 + MiniLM) with untrained
    heads, written to `out`."""
    config = config or ModelConfig()
    save_bundle(build_model(config, seed=0).eval(), load_tokenizer(config), out)
    return out


def archive_images(limit: int) -> list[Path]:
    """The first `limit` JPEGs (0: all) of medpix then covid-cxr under the data root."""
    images = [
        path
        for name in ARCHIVE_DATASETS
        for path in sorted((data_root() / name / "images").glob("*.jpg"))
    ]
    if not images:
        raise SystemExit(f"no images under {data_root()}: set CONVIRT_DATA_ROOT")
    return images[:limit] if limit else images


def link_archive(images: list[Path], folder: Path) -> Path:
    """A folder of symlinks to `images` (no copies of the data), one subfolder per dataset, that
    `build --images` scans."""
    for image in images:
        target = folder / image.parent.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(image)
    return folder


def add_build_arguments(parser: argparse.ArgumentParser, limit: int, limit_help: str) -> None:
    """--model, --limit, --batch-size, --workers and --device, as the index benchmarks take them."""
    parser.add_argument(
        "--model", type=Path, help="bundle (default: the default config, untrained)"
    )
    parser.add_argument("--limit", type=int, default=limit, help=limit_help)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--device", default="cpu")


def percentiles_ms(latencies: list[float], digits: int = 1) -> dict[str, float | None]:
    """p50_ms and p99_ms of latencies in seconds (None for both when there are none)."""
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.array(latencies) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), digits) for q in (50, 99)}


@dataclass
class Latencies:
    """What a load test's requests took (seconds) and how many failed; the benches add their own
    counts and summaries."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
