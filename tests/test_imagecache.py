"""The image cache: decoded once, keyed by content and side, resumable after kill -9."""

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, write_manifest

from convirt import cachebuild
from convirt.cachebuild import Resolver, decode_file
from convirt.imagecache import CacheError, ImageCache, cache_root, pixel_file
from convirt.imageio import load_image, resize_shorter
from convirt.manifest import Skip, iter_manifest


def resolve(cache: ImageCache, manifest, side: int = 64) -> tuple[list, Resolver]:
    resolver = Resolver(cache, side, workers=1, progress=False)
    return list(resolver.resolve(iter_manifest(manifest))), resolver


@pytest.fixture
def small_archive(datasets, tmp_path):
    """Four real medpix images copied into a folder of their own, with a manifest."""
    rows = read_rows(datasets / "medpix" / "manifest.csv")[:4]
    folder = tmp_path / "archive"
    folder.mkdir()
    for row in rows:
        shutil.copy(datasets / "medpix" / row["image"], folder / row["image"].split("/")[-1])
        row["image"] = row["image"].split("/")[-1]
    return write_manifest(folder / "manifest.csv", rows, folder)


def test_images_are_decoded_once_and_read_back_exactly(small_archive, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    first, resolver = resolve(cache, small_archive)
    assert resolver.counts.decoded == 4 and resolver.counts.hashed == 4
    again, resolver = resolve(cache, small_archive)
    assert resolver.counts.decoded == 0 and resolver.counts.hashed == 0
    assert [entry for _, entry in again] == [entry for _, entry in first]
    item, entry = first[2]
    expected = np.array(resize_shorter(load_image(item.path), 64))
    assert np.array_equal(cache.reader(64).read(entry), expected)
    assert min(entry.height, entry.width) == 64


def test_a_changed_file_is_decoded_again_and_a_moved_one_is_not(small_archive, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    before, _ = resolve(cache, small_archive)
    paths = [item.path for item, _ in before]
    paths[0].rename(paths[0].with_name("moved.jpg"))
    shutil.copy(paths[2], paths[1])  # the second file now holds the third's content...
    shutil.copy(paths[3], paths[2])  # ... and the third the fourth's
    rows = read_rows(small_archive)
    rows[0]["image"] = "moved.jpg"
    write_manifest(small_archive, rows, small_archive.parent)
    after, resolver = resolve(cache, small_archive)
    assert resolver.counts.hashed == 3  # the moved file and the two changed ones
    assert resolver.counts.decoded == 0  # every content was cached already
    assert [e for _, e in after] == [before[0][1], before[2][1], before[3][1], before[3][1]]


def test_two_sides_live_side_by_side(small_archive, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    resolve(cache, small_archive, side=64)
    big, resolver = resolve(cache, small_archive, side=96)
    assert resolver.counts.decoded == 4 and resolver.counts.hashed == 0
    info = cache.info()
    assert sorted(info["sides"]) == [64, 96] and info["files"] == 4
    assert all(min(e.height, e.width) == 96 for _, e in big)


def test_unreadable_images_are_listed_with_reasons_and_not_retried(small_archive, tmp_path):
    (small_archive.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = read_rows(small_archive)
    rows += [{**rows[0], "image": "broken.png"}, {**rows[0], "image": "gone.png"}]
    write_manifest(small_archive, rows, small_archive.parent)
    cache = ImageCache(tmp_path / "cache")
    out, resolver = resolve(cache, small_archive)
    skips = [entry for entry in out if isinstance(entry, Skip)]
    assert [s.path.rsplit("/", 1)[-1] for s in skips] == ["broken.png", "gone.png"]
    assert "corrupt or truncated image" in skips[0].reason
    assert "not found" in skips[1].reason
    assert resolver.counts.decoded == 4 and resolver.counts.undecodable == 1
    _, resolver = resolve(cache, small_archive)
    assert resolver.counts.undecodable == 0 and len(resolver.counts.skipped) == 2


def test_an_uncommitted_tail_is_cut_and_damage_is_reported(small_archive, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    out, _ = resolve(cache, small_archive)
    data = pixel_file(cache.root, 64)
    committed = data.stat().st_size
    with open(data, "ab") as f:
        f.write(b"half an image from a killed writer")
    cache.writer().close()
    assert data.stat().st_size == committed
    with open(data, "r+b") as f:
        f.truncate(committed - 10)
    with pytest.raises(CacheError, match="damaged; delete its folder"):
        cache.reader(64).read(out[-1][1])


def cache_build(cache, manifests, workers=2) -> list[str]:
    command = [sys.executable, "-m", "convirt.cli", "cache", "build", "--cache", str(cache)]
    command += ["--size", "96", "--workers", str(workers), "--no-progress"]
    for manifest in manifests:
        command += ["--manifest", str(manifest)]
    return command


def committed(cache) -> int:
    db = cache_root(cache) / "cache.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        except sqlite3.OperationalError:  # schema not written yet
            return 0


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def snapshot(cache) -> tuple:
    with sqlite3.connect(cache_root(cache) / "cache.sqlite") as conn:
        tables = tuple(
            conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("entries", "failures", "files")
        )
    return tables, pixel_file(cache_root(cache), 96).read_bytes()


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_to_an_identical_cache(datasets, tmp_path):
    manifests = [datasets / "roco" / "manifest.csv", datasets / "medpix" / "manifest.csv"]
    reference = tmp_path / "reference"
    subprocess.run(cache_build(reference, manifests), check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(cache_build(killed, manifests), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while committed(killed) < 256 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = children(process.pid)
    process.kill()
    assert process.wait() == -9, "the build finished before it could be killed"
    assert workers, "the build ran no worker processes"
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "orphaned workers"
    done_before = committed(killed)
    total = committed(reference)
    assert 0 < done_before < total
    resumed = subprocess.run(cache_build(killed, manifests), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["decoded"] == total - done_before
    assert snapshot(killed) == snapshot(reference)


def test_a_read_error_or_a_file_changing_skips_the_row_for_this_run_only(
    small_archive, tmp_path, monkeypatch
):
    item = next(i for i in iter_manifest(small_archive) if not isinstance(i, Skip))
    sha = hashlib.sha256(item.path.read_bytes()).hexdigest()
    assert isinstance(decode_file(str(item.path), 64, "0" * 64), Skip)  # changed since hashed
    assert isinstance(decode_file(str(tmp_path / "gone.jpg"), 64, sha), Skip)  # unreadable
    assert not isinstance(decode_file(str(item.path), 64, sha), Skip | str)
    real = cachebuild.decode_file
    monkeypatch.setattr(cachebuild, "decode_file", lambda p, *a: Skip(p, "cannot read: EIO"))
    cache = ImageCache(tmp_path / "cache")
    out, _ = resolve(cache, small_archive)
    assert all(isinstance(row, Skip) and "EIO" in row.reason for row in out)
    assert cache.undecodable([sha]) == {}  # nothing remembered against the content
    monkeypatch.setattr(cachebuild, "decode_file", real)
    out, resolver = resolve(cache, small_archive)
    assert resolver.counts.decoded == 4 and not any(isinstance(row, Skip) for row in out)
