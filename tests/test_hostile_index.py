"""Faults a hostile probe found in the index and the service (issue 10, items 3, 5 and 9).

A small real index (6 medpix images) is served by real `convirt serve` processes on loopback. A
damaged version is made the way a bad copy or a broken disk would: a version directory is copied
under the next name, one file in it is truncated or garbled, and CURRENT is switched to it with
index.layout's own function, as a writer publishing it would. Disk-full runs write into a real
2 MiB tmpfs (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import INDEX_OPTIONS, error_of, server_settings
from serving import ServerProcess, ServerStartError
from test_service import API_KEY, medpix_rows, metric, write_manifest

from index import cli, layout
from index.sources.manifest import read_manifest
from index.write.build import build

IMAGES = 6
POLL_SECONDS = 0.2
TMPFS_BYTES = 2 * 2**20
Damage = Callable[[Path], None]


# -- damage ----------------------------------------------------------------------------------------


def truncate_meta(version: Path) -> None:
    path = version / "meta.sqlite"
    os.truncate(path, path.stat().st_size // 2)


def garble_faiss(version: Path) -> None:
    path = version / "joint.faiss"
    data = bytearray(path.read_bytes())
    data[: min(len(data), 256)] = b"\xff" * min(len(data), 256)
    path.write_bytes(bytes(data))


def drop_a_metadata_row(version: Path) -> None:
    """A valid SQLite file (quick_check passes) with one image fewer than FAISS and the vectors."""
    with sqlite3.connect(version / "meta.sqlite") as conn:
        conn.execute("DELETE FROM images WHERE id = (SELECT min(id) FROM images)")
    conn.close()


def truncate_vectors(version: Path) -> None:
    path = version / "encoder.npy"
    os.truncate(path, path.stat().st_size // 2)


def publish_copy(root: Path, damage: Damage | None = None, source: str | None = None) -> str:
    """Copy a version (default: the current one) under the next name, damage it, and switch
    CURRENT to it."""
    name = layout.next_version_name(root)
    target = layout.versions_dir(root) / name
    shutil.copytree(layout.versions_dir(root) / (source or layout.read_current(root)), target)
    info = json.loads((target / "version.json").read_text())
    (target / "version.json").write_text(json.dumps({**info, "version": name}))
    if damage is not None:
        damage(target)
    layout.switch_current(root, name)
    return name


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine_root(tmp_path_factory, bundle_dir, datasets) -> Path:
    folder = tmp_path_factory.mktemp("hostile-index")
    manifest = write_manifest(folder / "m.csv", medpix_rows(datasets, "train", IMAGES))
    build(folder / "root", bundle_dir, read_manifest(manifest), INDEX_OPTIONS)
    return folder / "root"


def copy_root(pristine_root: Path, tmp_path_factory, name: str) -> Path:
    target = tmp_path_factory.mktemp(name) / "root"
    shutil.copytree(pristine_root, target)
    return target


def serve(bundle_dir: Path, root: Path, **extra: object) -> dict[str, object]:
    return server_settings(bundle_dir, root, CONVIRT_API_KEY=API_KEY, **extra)


def running(settings: dict[str, object]) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    with ServerProcess(settings) as process:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            yield process, client
        process.stop()
        assert "Traceback" not in process.output(), process.output()


@pytest.fixture(scope="module")
def manual_root(pristine_root, tmp_path_factory) -> Path:
    return copy_root(pristine_root, tmp_path_factory, "manual")


@pytest.fixture(scope="module")
def manual(bundle_dir, manual_root) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    """A server that reloads only when asked (so every failed reload counted is the test's)."""
    yield from running(serve(bundle_dir, manual_root))


@pytest.fixture(scope="module")
def polling_root(pristine_root, tmp_path_factory) -> Path:
    return copy_root(pristine_root, tmp_path_factory, "polling")


@pytest.fixture(scope="module")
def polling(bundle_dir, polling_root) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    yield from running(serve(bundle_dir, polling_root, CONVIRT_RELOAD_POLL_SECONDS=POLL_SECONDS))


@pytest.fixture
def manual_client(manual, manual_root) -> Iterator[httpx.Client]:
    """The manual server's client; CURRENT is put back on the served version afterwards."""
    served = layout.read_current(manual_root)
    yield manual[1]
    layout.switch_current(manual_root, served)


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A real 2 MiB filesystem, so a write runs out of space the way a full disk does."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# -- helpers ---------------------------------------------------------------------------------------


def reload(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})


def failed_reloads(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "convirt_index_reloads_total", outcome="failed")


def assert_still_serving(client: httpx.Client, version: str) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["index_version"] == version, ready.text
    found = client.post("/v1/search/text", json={"text": "mass in the brain", "k": 3})
    assert found.status_code == 200, found.text
    results = found.json()["results"]
    assert len(results) == 3 and found.json()["index_version"] == version
    thumbnail = client.get(results[0]["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"


def refused_reload(client: httpx.Client, damage: Damage, root: Path, words: str) -> dict:
    """Publish a damaged copy; the reload is refused (503) and counted; the old one serves."""
    served = client.get("/readyz").json()["index_version"]
    before = failed_reloads(client)
    bad = publish_copy(root, damage)
    error = error_of(reload(client), 503, "index_damaged")
    assert bad in error["message"] and words in error["message"], error
    assert any(words in problem for problem in error["details"]["problems"]), error
    assert failed_reloads(client) == before + 1
    assert_still_serving(client, served)
    return error


def fill(disk: Path, leave: int) -> Path:
    """Fill a filesystem until only `leave` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def index_command(*args: str) -> list[str]:
    return [*args, "--workers", "1", "--batch-size", "8", "--no-progress"]


def assert_disk_full_message(text: str, disk: Path, operation: str) -> None:
    assert "Traceback" not in text, text
    assert "no space left on the disk" in text and f"mounted at {disk}" in text, text
    assert "free of 2.0 MiB" in text and f"this {operation} needs about" in text, text
    assert "Nothing was published" in text, text


# -- item 3: a damaged version is never switched to ------------------------------------------------


def test_a_truncated_meta_sqlite_is_refused_on_reload_and_the_old_version_keeps_serving(
    manual_client, manual_root
):
    refused_reload(manual_client, truncate_meta, manual_root, "meta.sqlite")


def test_a_version_whose_sqlite_count_disagrees_with_faiss_is_refused_on_reload(
    manual_client, manual_root
):
    error = refused_reload(manual_client, drop_a_metadata_row, manual_root, "counts disagree")
    assert f"meta.sqlite {IMAGES - 1}" in error["message"]


def test_a_truncated_vectors_file_is_refused_on_reload(manual_client, manual_root):
    refused_reload(manual_client, truncate_vectors, manual_root, "encoder.npy")


def test_an_unreadable_current_file_answers_503_and_the_old_version_keeps_serving(
    manual_client, manual_root, capsys
):
    served = manual_client.get("/readyz").json()["index_version"]
    before = failed_reloads(manual_client)
    (manual_root / layout.CURRENT_NAME).write_bytes(b"\xff\xfe not a version name")
    error = error_of(reload(manual_client), 503, "index_unavailable")
    assert "CURRENT cannot be read" in error["message"] and "UnicodeDecodeError" in error["message"]
    assert failed_reloads(manual_client) == before + 1
    assert_still_serving(manual_client, served)
    assert cli.main(["info", "--root", str(manual_root)]) == 1
    err = capsys.readouterr().err
    assert "CURRENT cannot be read" in err and "Traceback" not in err, err


def test_a_damaged_version_at_start_keeps_the_service_from_becoming_ready(
    bundle_dir, pristine_root, tmp_path_factory
):
    root = copy_root(pristine_root, tmp_path_factory, "bad-start")
    bad = publish_copy(root, truncate_meta)
    with pytest.raises(ServerStartError) as failure, ServerProcess(serve(bundle_dir, root)):
        pass
    text = str(failure.value)
    assert "exited with 2" in text and f"index version {bad}" in text, text
    assert "meta.sqlite" in text and "Traceback" not in text, text


def test_verify_reports_damaged_files_as_findings_not_a_traceback(
    pristine_root, tmp_path_factory, capsys
):
    root = copy_root(pristine_root, tmp_path_factory, "verify")

    def wreck(version: Path) -> None:
        truncate_meta(version)
        garble_faiss(version)
        truncate_vectors(version)

    bad = publish_copy(root, wreck)
    assert cli.main(["verify", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"version {bad}: 3 problems" in out, out
    for name in ("meta.sqlite cannot be read", "joint.faiss cannot be read", "encoder.npy"):
        assert name in out, out
    assert cli.main(["verify", "--root", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and len(report["problems"]) == 3


# -- item 5: an unreadable .faiss is a 503, counted, and never stops the poller --------------------


def test_a_garbled_faiss_file_answers_503_and_counts_a_failed_reload(manual_client, manual_root):
    # refused before FAISS parses it: its bytes are not those published (version.json's SHA-256)
    refused_reload(
        manual_client, garble_faiss, manual_root, "joint.faiss is not the file published"
    )


def test_the_poller_survives_an_unreadable_faiss_and_picks_up_the_next_good_version(
    polling, polling_root
):
    process, client = polling
    served = client.get("/readyz").json()["index_version"]
    publish_copy(polling_root, garble_faiss)
    deadline = time.monotonic() + 30
    while failed_reloads(client) < 1:
        assert time.monotonic() < deadline, process.output()
        time.sleep(POLL_SECONDS)
    time.sleep(5 * POLL_SECONDS)  # more polls: the refused version is not read again
    assert failed_reloads(client) == 1
    assert_still_serving(client, served)
    good = publish_copy(polling_root, source=served)
    deadline = time.monotonic() + 30
    while client.get("/readyz").json()["index_version"] != good:
        assert time.monotonic() < deadline, process.output()
        time.sleep(POLL_SECONDS)
    assert_still_serving(client, good)
    log = process.output()
    assert log.count("index not reloaded") == 1, log
    assert "joint.faiss is not the file published" in log, log


# -- item 9: a full disk is a clear error, not a traceback -----------------------------------------


def test_disk_full_during_build_names_the_disk_and_the_space_and_exits_2(
    tmpfs, bundle_dir, datasets, tmp_path, capsys
):
    manifest = write_manifest(tmp_path / "m.csv", medpix_rows(datasets, "train", IMAGES))
    fill(tmpfs, 16 * 1024)
    root = tmpfs / "root"
    command = index_command("build", "--model", str(bundle_dir), "--manifest", str(manifest))
    assert cli.main([*command, "--out", str(root)]) == 2
    assert_disk_full_message(capsys.readouterr().err, tmpfs, "build")
    assert layout.read_current(root) is None and layout.list_versions(root) == []


def test_disk_full_during_add_and_remove_keeps_the_current_version(
    tmpfs, bundle_dir, datasets, tmp_path, capsys
):
    rows = medpix_rows(datasets, "train", 2 * IMAGES)
    first = write_manifest(tmp_path / "first.csv", rows[:IMAGES])
    more = write_manifest(tmp_path / "more.csv", rows[IMAGES:])
    root = tmpfs / "root"
    model = ["--model", str(bundle_dir)]
    assert (
        cli.main(index_command("build", *model, "--manifest", str(first), "--out", str(root))) == 0
    )
    capsys.readouterr()
    published = layout.read_current(root)
    version = layout.current_version_dir(root)
    version_bytes = sum(p.stat().st_size for p in version.iterdir())

    filler = fill(tmpfs, 0)  # a remove writes only a list of deleted ids: no room even for it
    assert cli.main(["remove", "--root", str(root), "--path", rows[0]["image"]]) == 2
    assert_disk_full_message(capsys.readouterr().err, tmpfs, "remove")
    filler.unlink()
    filler = fill(tmpfs, version_bytes // 2)  # not room for a segment as large as the version
    add = index_command("add", *model, "--manifest", str(more), "--root", str(root))
    assert cli.main(add) == 2
    assert_disk_full_message(capsys.readouterr().err, tmpfs, "add")
    assert layout.read_current(root) == published
    assert not any(
        p.name.startswith(layout.TMP_PREFIX) for p in layout.versions_dir(root).iterdir()
    )

    filler.unlink()  # space again: the same command now succeeds
    assert cli.main(add) == 0
    assert f"with {2 * IMAGES} images" in capsys.readouterr().out
