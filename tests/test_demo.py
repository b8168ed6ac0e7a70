"""`make demo` end to end (scripts/demo.sh) on a miniature data root: archive, train, evaluate,
index, serve, query; then a second run that reuses every step.

The miniature data root mirrors ../shared/datasets (a manifest per dataset, `images` a symlink to
the real folder), with a few rows each; training is cut to two steps at 64 px.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import read_rows
from serving import free_port

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo.sh"
READY_LINE = "Serving until Ctrl-C."
TRAIN_ARGS = "--max-steps 2 --epochs 1 --image-size 64 --batch-size 4 --no-progress"


def mini_dataset(source: Path, out: Path, per_split: int) -> None:
    rows = read_rows(source / "manifest.csv")
    picked = [r for r in rows if r["split"] == "train"][:per_split]
    picked += [r for r in rows if r["split"] == "dev"][:per_split]
    out.mkdir(parents=True)
    (out / "images").symlink_to(source / "images", target_is_directory=True)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)


@pytest.fixture(scope="module")
def demo_env(datasets: Path, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("demo")
    for name in ("medpix", "covid-cxr", "covid-ct", "roco"):
        mini_dataset(datasets / name, folder / "data" / name, per_split=8)
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CONVIRT_DATA_ROOT": str(folder / "data"),
        "CONVIRT_DEMO_DIR": str(folder / "runs"),
        "CONVIRT_CONFIG": "cpu",
        "CONVIRT_DEMO_TRAIN_ARGS": TRAIN_ARGS,
        "CONVIRT_PORT": str(free_port()),
    }


def run_demo(env: dict[str, str], log: Path, timeout: float = 600) -> subprocess.Popen:
    """Start the demo and wait until it serves; the caller stops it."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", str(DEMO)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while READY_LINE not in log.read_text(errors="replace"):
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the demo did not serve within {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.5)
    return process


def stop(process: subprocess.Popen, url: str) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=5)  # the service went down with the demo


def test_demo_serves_then_reuses_everything(demo_env, tmp_path):
    url = f"http://127.0.0.1:{demo_env['CONVIRT_PORT']}"
    first_log = tmp_path / "first.log"
    process = run_demo(demo_env, first_log)
    try:
        output = first_log.read_text()
        assert "archive: 64 images" in output and "(written)" in output
        assert "text_to_image/recall@10" in output  # the evaluation tables were printed
        assert "build: version 000001 with" in output
        assert "Its answer" in output and f"curl -s {url}/v1/search/text" in output
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        answer = httpx.post(
            f"{url}/v1/search/text", json={"text": "pleural effusion", "k": 3}, timeout=60
        ).json()
        assert len(answer["results"]) == 3
        relpath = answer["results"][0]["metadata"]["relpath"]
        assert relpath.split("/")[0] in (
            "medpix",
            "covid-cxr",
            "covid-ct",
            "roco",
        )  # paths through the archive links
        assert httpx.get(url + answer["results"][0]["thumbnail_url"], timeout=30).status_code == 200
    finally:
        stop(process, url)

    second_log = tmp_path / "second.log"
    process = run_demo(demo_env, second_log, timeout=300)
    try:
        output = second_log.read_text()
        assert "(unchanged)" in output
        assert "reusing its bundle" in output
        assert "up to date: " in output  # evaluation tables
        assert "up to date (same model and manifest)" in output
        assert "build:" not in output
        assert httpx.get(f"{url}/readyz", timeout=30).json()["index_version"] == "000001"
    finally:
        stop(process, url)
