"""Shared fixtures: small real subsets of ../shared/datasets written as manifests in tmp dirs."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serving import ServerProcess

from convirt.bundle import load_tokenizer, save_bundle
from convirt.config import ModelConfig
from convirt.model import build_model
from convirt.paths import data_root
from index.read.store import open_current
from index.sources.manifest import read_manifest
from index.write.build import Options
from index.write.build import build as build_index
from index.write.rewrite import reindex
from training.config import TrainConfig

INDEX_OPTIONS = Options(batch_size=8, chunk_batches=1, workers=2, progress=False)


def find_tool(name: str, install: str) -> str:
    """A command-line tool's path (the venv's bin first). Missing: the test skips, naming the
    command that installs it, or fails when CONVIRT_REQUIRE_TOOLS=1 (CI, which installs them)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found:
        return found
    message = f"{name} not found: {install}"
    if os.environ.get("CONVIRT_REQUIRE_TOOLS") == "1":
        pytest.fail(message + " (CONVIRT_REQUIRE_TOOLS=1)")
    pytest.skip(message)


# Small but real: the tests train and embed at this size to stay fast on two cores.
TEST_IMAGE_SIZE = 64


@pytest.fixture(scope="session", autouse=True)
def image_cache_dir(tmp_path_factory) -> Path:
    """One image cache for the session (never the user's ~/.cache), inherited by subprocesses."""
    folder = tmp_path_factory.mktemp("convirt-cache")
    os.environ["CONVIRT_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def datasets() -> Path:
    root = data_root()
    if not (root / "covid-cxr" / "manifest.csv").is_file():
        pytest.fail(f"shared datasets not found at {root}: set CONVIRT_DATA_ROOT")
    return root


def read_rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_manifest(path: Path, rows: list[dict[str, str]], source_dir: Path) -> Path:
    """Write rows as a CSV in path's folder, image paths rewritten relative to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            image = row["image"]
            if not os.path.isabs(image):
                image = os.path.relpath(source_dir / image, path.parent)
            writer.writerow({**row, "image": image})
    return path


@pytest.fixture(scope="session")
def medpix_subset(datasets: Path, tmp_path_factory) -> Path:
    """24 medpix train pairs and 12 dev pairs: real images, real captions."""
    rows = read_rows(datasets / "medpix" / "manifest.csv")
    picked = [r for r in rows if r["split"] == "train"][:24] + [
        r for r in rows if r["split"] == "dev"
    ][:12]
    return write_manifest(
        tmp_path_factory.mktemp("medpix") / "manifest.csv", picked, datasets / "medpix"
    )


@pytest.fixture(scope="session")
def small_model_config() -> ModelConfig:
    return ModelConfig(image_size=TEST_IMAGE_SIZE, max_text_tokens=32)


def make_bundle(config: ModelConfig, seed: int, out: Path) -> Path:
    """An untrained model saved as a bundle: real weights, real format, fast to make."""
    save_bundle(build_model(config, seed=seed).eval(), load_tokenizer(config), out)
    return out


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, small_model_config) -> Path:
    return make_bundle(small_model_config, 0, tmp_path_factory.mktemp("bundle") / "bundle")


def small_train_config(model_config: ModelConfig, **overrides) -> TrainConfig:
    """A training config for short real runs on a subset: tiny batches, two epochs, CPU."""
    settings = dict(model=model_config, batch_size=4, epochs=2, num_workers=1, device="cpu", seed=3)
    return TrainConfig(**{**settings, **overrides})


def epoch_rows(out_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv."""
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict[str, str]], fields: list[str]) -> Path:
    """Rows as a CSV manifest, image paths as they are (a field a row lacks is left empty)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def built_root(folder: Path, bundle, source, options: Options = INDEX_OPTIONS) -> Path:
    """folder/root: a real index of `source` (a Source), built by `bundle` (a folder or Bundle)."""
    build_index(folder / "root", bundle, source, options)
    return folder / "root"


def index_of_rows(folder: Path, bundle, rows: list[dict[str, str]], fields: list[str]) -> Path:
    """A real index (folder/root) of rows with absolute image paths: nothing is copied."""
    manifest = write_csv(folder / "manifest.csv", rows, fields)
    return built_root(folder, bundle, read_manifest(manifest))


def written_before_issue_25(root: Path, out: Path) -> Path:
    """A copy of an index root whose current version looks as versions written before issue 25
    do: thumbnails inside meta.sqlite's images, no facets or field tables stored
    (index/write/lookups.py)."""
    import sqlite3
    from contextlib import closing

    shutil.copytree(root, out)
    version = out / "versions" / (out / "CURRENT").read_text().strip()
    with closing(sqlite3.connect(version / "meta.sqlite")) as conn:
        tables = [r[0] for r in conn.execute("SELECT tab FROM field_tables WHERE tab IS NOT NULL")]
        for table in [*tables, "field_tables", "facet_fields", "facet_values"]:
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DELETE FROM sqlite_stat1")
        conn.execute("ALTER TABLE images ADD COLUMN thumbnail BLOB NOT NULL DEFAULT x''")
        conn.execute("ATTACH DATABASE ? AS thumbs", (str(version / "thumbs.sqlite"),))
        conn.execute(
            "UPDATE images SET thumbnail = "
            "(SELECT jpeg FROM thumbs.thumbnails WHERE thumbnails.id = images.id)"
        )
        conn.commit()
        conn.execute("DETACH DATABASE thumbs")
        conn.execute("VACUUM")
    (version / "thumbs.sqlite").unlink()
    return out


def server_settings(model: Path, root: Path, **extra: object) -> dict[str, object]:
    """A `convirt serve` environment: the bundle, the index root, warnings only, then `extra`
    (CONVIRT_* names, which may override those)."""
    return {
        "CONVIRT_MODEL": model,
        "CONVIRT_INDEX_ROOT": root,
        "CONVIRT_LOG_LEVEL": "warning",
        **extra,
    }


@contextmanager
def serving(settings: dict) -> Iterator[ServerProcess]:
    """A real `convirt serve` on loopback that must stop cleanly and log no traceback."""
    with ServerProcess(settings) as process:
        yield process
        # uvicorn shuts down gracefully on SIGTERM, then exits by re-raising it
        assert process.stop() in (0, -signal.SIGTERM), process.output()
        assert "Traceback" not in process.output(), process.output()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    """An HTTP session with the module's `server` fixture (a ServerProcess)."""
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def error_of(response, status: int, code: str | None = None) -> dict:
    """The JSON error body of a refused request, checked for shape, status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def browser_page(viewport: dict | None = None) -> Iterator[tuple]:
    """(browser, page, expect): Debian's chromium driven by Playwright (no browser download).
    A JavaScript error on the page fails the test."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs `pip install playwright`")
    chromium = find_tool("chromium", "apt-get install -y chromium")
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=viewport or {"width": 1280, "height": 1000})
        page.on("pageerror", lambda err: errors.append(str(err)))
        yield browser, page, sync_api.expect
        browser.close()
    assert errors == []


def calibrated_scales(client: httpx.Client, timeout: float = 120) -> dict[str, dict]:
    """Every kind's score scale (GET /v1/scores), once the service's background calibration has
    done them all: until then results carry no `match` label. What is there at the deadline."""
    from service.search.calibration import KINDS

    deadline = time.monotonic() + timeout
    while True:
        found = {s["kind"]: s for s in client.get("/v1/scores").json()["scales"]}
        if len(found) == len(KINDS) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


# About 3,000 real images of the shared datasets (every covid-cxr and covid-ct image, the first
# medpix and roco ones), embedded at 32 px by the test bundle's pretrained encoder (neighbours are
# real even this small) into one exact (flat) index: what the compressed and HNSW tests compare
# their structures with. Enough to train 64-byte codes and to measure recall on real neighbours.
REAL_DATASETS = ("covid-cxr", "medpix", "roco", "covid-ct")
REAL_FIELDS = ["image", "text", "dataset", "modality", "group"]
REAL_SIDE = 32
REAL_LIMITS = {"medpix": 1200, "roco": 1000}  # images taken at most (the rest: all)


def real_rows(datasets: Path) -> list[dict[str, str]]:
    """One row per image file: its dataset, modality and patient/case; the report only for
    covid-cxr (embedding every dataset's sentences would cost minutes)."""
    rows, seen = [], set()
    for name in REAL_DATASETS:
        taken, limit = 0, REAL_LIMITS.get(name)
        for row in read_rows(datasets / name / "manifest.csv"):
            image = str(datasets / name / row["image"])
            if image in seen or (limit is not None and taken >= limit):
                continue
            taken += 1
            seen.add(image)
            group = row.get("patient_id") or row.get("case_id") or row.get("pmc_article") or ""
            modality = row.get("modality") or row.get("modality_keyword") or ""
            text = row["text"] if name == "covid-cxr" else ""
            rows.append(dict(image=image, text=text, dataset=name, modality=modality, group=group))
    return rows


@pytest.fixture(scope="session")
def real_flat_root(datasets: Path, tmp_path_factory) -> Path:
    """The real ~3,000-image index, exact search; built once, read only (copy it to write)."""
    folder = tmp_path_factory.mktemp("real")
    config = ModelConfig(image_size=REAL_SIDE, max_text_tokens=32)
    bundle = make_bundle(config, 0, folder / "bundle")
    manifest = write_csv(folder / "manifest.csv", real_rows(datasets), REAL_FIELDS)
    options = Options(batch_size=64, chunk_batches=8, workers=2, progress=False)
    build_index(folder / "flat", bundle, read_manifest(manifest), options)
    return folder / "flat"


def real_pair(real_flat_root: Path, folder: Path, index_type: str) -> tuple[Path, Path]:
    """(the real flat root, a copy of it in `folder` reindexed as `index_type`)."""
    other = folder / index_type
    shutil.copytree(real_flat_root, other)
    reindex(other, index_type)
    return real_flat_root, other


def opened_pair(roots: tuple[Path, Path]) -> Iterator[tuple]:
    """Both roots opened for reading (a fixture's body: yields, then closes them)."""
    first, second = open_current(roots[0]), open_current(roots[1])
    yield first, second
    first.close()
    second.close()
