"""Segments (issue 25): add, sync and remove write what they change, compaction merges.

A real small index (real medpix images, a real untrained bundle, real FAISS and SQLite) is built
once; each test works on a copy. "Live data" is read from the files as the spec defines it (the
segments' ids less deleted.npy, their vectors and metadata rows), so it does not depend on the
server; where index.read can open a format-2 version, open_current is checked against it too.
Kill -9 tests run the write in a child process that SIGKILLs itself at a chosen point (just
before a segment or a version is renamed into place), then run the same write again.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import built_root

from index import cli, layout
from index.sources.folder import scan_folder
from index.version import read_version
from index.write.build import Options, add
from index.write.checks import verify
from index.write.compact import DELETED_SHARE, MAX_SEGMENTS, choose_merge, compact
from index.write.rewrite import remove

REPO = Path(__file__).resolve().parents[1]
OPTIONS = Options(batch_size=4, chunk_batches=1, workers=2, progress=False)
JOB_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "2", "--no-progress"]
BASE_IMAGES = 24
READER_HAS_SEGMENTS = importlib.util.find_spec("index.read.segmented") is not None


@pytest.fixture(scope="module")
def medpix_images(datasets) -> list[Path]:
    return sorted((datasets / "medpix" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, medpix_images, bundle_dir) -> Path:
    folder = tmp_path_factory.mktemp("segments")
    images = folder / "images"
    for image in medpix_images[:BASE_IMAGES]:
        copy(image, images / image.name)
    return built_root(folder, bundle_dir, scan_folder(images), OPTIONS)


@pytest.fixture(scope="module")
def extra(tmp_path_factory, medpix_images) -> Path:
    """Three images the base does not hold."""
    folder = tmp_path_factory.mktemp("extra")
    for image in medpix_images[40:43]:
        copy(image, folder / image.name)
    return folder


def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def current(root: Path):
    return read_version(layout.current_version_dir(root))


def live(root: Path) -> dict[int, tuple]:
    """id -> (path, sha256, meta, report, thumbnail, joint, encoder) of every served image."""
    version = current(root)
    deleted = set(version.deleted().tolist())
    found: dict[int, tuple] = {}
    for segment in version.segments():
        ids = segment.ids()
        joint, encoder = segment.vectors("joint"), segment.vectors("encoder")
        with closing(sqlite3.connect(segment.meta_path)) as conn:
            conn.execute("ATTACH DATABASE ? AS t", (str(segment.directory / "thumbs.sqlite"),))
            rows = {
                r[0]: r[1:]
                for r in conn.execute(
                    "SELECT i.id, path, sha256, meta, report, jpeg FROM images i "
                    "JOIN t.thumbnails USING (id)"
                )
            }
        for row, image_id in enumerate(ids.tolist()):
            assert image_id not in found, "an id held live by two segments"
            if image_id not in deleted:
                found[image_id] = (*rows[image_id], joint[row].tolist(), encoder[row].tolist())
    assert len(found) == version.info["count"]
    return found


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for image_id in a:
        assert a[image_id][:5] == b[image_id][:5]
        for k in (5, 6):
            np.testing.assert_allclose(a[image_id][k], b[image_id][k], atol=1e-5)


def new_bytes(root: Path, before: set[Path]) -> int:
    after = {p for p in root.rglob("*") if p.is_file() and "staging" not in p.parts}
    return sum(p.stat().st_size for p in after - before)


def files_of(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def check_served(root: Path, expected: dict) -> None:
    """Through the server's reader, when it opens format-2 versions (index.read.segmented)."""
    if not READER_HAS_SEGMENTS:
        return
    from index.read.store import open_current

    with open_current(root) as store:
        assert sorted(np.asarray(store.ids).tolist()) == sorted(expected)
        for image_id, row in list(expected.items())[:5]:
            assert store.get(image_id)["path"] == row[0]


# -- add, remove, compact ---------------------------------------------------------------------------


def test_add_writes_one_segment_of_the_new_images_only(base, extra, bundle_dir, tmp_path):
    root = shutil.copytree(base, tmp_path / "root")
    before, old_files = live(root), files_of(root)
    base_bytes = layout.tree_bytes(root / "versions" / "000001")
    summary = add(root, bundle_dir, scan_folder(extra), OPTIONS)
    assert summary.count == BASE_IMAGES + 3 and summary.changes["embedded"] == 3
    version = current(root)
    assert version.is_segmented
    assert version.info["segments"] == ["versions/000001", "segments/000002"]
    assert len(version.deleted()) == 0
    segment = read_version(root / "segments" / "000002")
    after = live(root)
    assert sorted(segment.ids().tolist()) == sorted(set(after) - set(before))
    assert {after[i][0] for i in segment.ids().tolist()} == {
        str(p) for p in sorted(extra.iterdir())
    }
    assert {i: after[i] for i in before} == before  # old rows and vectors as they were
    written = new_bytes(root, old_files)
    assert written < base_bytes / 3, (written, base_bytes)  # 3 images of 27, plus fixed costs
    assert files_of(root) >= old_files  # nothing of version 1 rewritten or removed
    assert read_version(root / "versions" / "000001").ids().tolist() == sorted(before)
    assert verify(root).ok, verify(root).problems
    check_served(root, after)
    again = add(root, bundle_dir, scan_folder(extra), OPTIONS)  # nothing new: no segment
    assert again.changes["already_indexed"] == 3 and again.count == BASE_IMAGES + 3
    assert current(root).info["segments"] == version.info["segments"]


def test_remove_writes_deleted_ids_and_copies_nothing(base, tmp_path):
    root = shutil.copytree(base, tmp_path / "root")
    before, old_files = live(root), files_of(root)
    doomed = sorted(before)[:2]
    summary = remove(root, ids=doomed)
    assert summary.count == BASE_IMAGES - 2
    version = current(root)
    assert version.info["segments"] == ["versions/000001"]
    assert version.deleted().tolist() == doomed
    assert not (root / "segments").exists() or not any((root / "segments").iterdir())
    assert new_bytes(root, old_files) < 16_384  # version.json, deleted.npy, the report
    after = live(root)
    assert after == {i: row for i, row in before.items() if i not in doomed}
    assert verify(root).ok, verify(root).problems
    check_served(root, after)


def test_compact_merges_live_rows_and_old_versions_stay_until_pruned(
    base, extra, bundle_dir, tmp_path
):
    root = shutil.copytree(base, tmp_path / "root")
    add(root, bundle_dir, scan_folder(extra), OPTIONS)
    doomed = sorted(live(root))[:3]
    remove(root, ids=doomed)
    before = live(root)
    assert len(current(root).info["segments"]) == 2
    summary = compact(root, keep=10)
    assert summary.published and summary.count == len(before)
    version = current(root)
    assert version.info["segments"] == [f"segments/{version.name}"]
    assert len(version.deleted()) == 0
    assert live(root) == before  # the same ids, rows, thumbnails and vectors, bit for bit
    for name in ("000001", "000002", "000003"):  # older versions still readable
        old = read_version(root / "versions" / name)
        assert all(s.directory.is_dir() for s in old.segments())
    assert not compact(root).published  # one segment, nothing deleted: nothing to do
    assert verify(root).ok, verify(root).problems
    check_served(root, before)
    remove(root, ids=sorted(before)[:1], keep=1)  # prune: only what the kept version lists
    listed = set(current(root).info["segments"])
    assert layout.list_versions(root) == [current(root).name]
    assert {f"segments/{n}" for n in layout.list_segments(root)} == listed


def test_readding_a_removed_image_rewrites_the_segment_that_held_it(base, bundle_dir, tmp_path):
    root = shutil.copytree(base, tmp_path / "root")
    before = live(root)
    gone = sorted(before)[0]
    remove(root, ids=[gone])  # 1 of 24 deleted: below the policy's share, nothing merged
    assert current(root).deleted().tolist() == [gone]
    again = copy(Path(before[gone][0]), tmp_path / "again" / "back.jpg")
    add(root, bundle_dir, scan_folder(again.parent), OPTIONS)  # the same content comes back
    version = current(root)
    assert len(version.deleted()) == 0  # no id both deleted and live
    assert version.info["segments"] == [f"segments/{version.name}"]  # its segment rewritten
    after = live(root)
    assert sorted(after) == sorted(before) and after[gone][0] == str(again)
    assert verify(root).ok, verify(root).problems


def test_the_policy_merges_small_segments_first_and_mostly_deleted_ones():
    big = (100_000, 100_000)
    small = [(1_000, 1_000)] * MAX_SEGMENTS
    assert choose_merge([big, *small[:-1]]) == []  # 8 segments: fine
    chosen = choose_merge([big, *small])  # 9: the 4 smallest, never the big one
    assert len(chosen) == 4 and 0 not in chosen
    holey = (70_000, 100_000)  # 30% deleted
    assert choose_merge([holey, (10, 10)]) == [0]
    assert DELETED_SHARE < 1 - 70_000 / 100_000
    assert choose_merge([(9, 10)], everything=True) == [0]
    assert choose_merge([(10, 10)], everything=True) == []


# -- kill -9 ------------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
from index import cli, layout
name = sys.argv[1]
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(layout, name, killed)
sys.exit(cli.main(sys.argv[2:]))
"""


def killed_at(point: str, command: list[str]) -> None:
    """Run `convirt index COMMAND` in a child that SIGKILLs itself when it calls layout.POINT."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.run(
        [sys.executable, "-c", KILLER, point, *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]


def unlisted_segments(root: Path) -> set[str]:
    listed = set()
    for name in layout.list_versions(root):
        listed.update(layout.listed_segments(root / "versions" / name))
    return {f"segments/{n}" for n in layout.list_segments(root)} - listed


def prepared(base: Path, extra: Path, bundle_dir: Path, folder: Path, operation: str) -> Path:
    """A copy of the base, made multi-segment first for a compaction."""
    root = shutil.copytree(base, folder)
    if operation == "compact":
        add(root, bundle_dir, scan_folder(extra), OPTIONS)
        remove(root, ids=sorted(live(root))[:2])
    return root


def command_of(operation: str, root: Path, bundle_dir: Path, extra: Path, doomed: int) -> list:
    if operation == "add":
        return ["add", "--root", str(root), "--model", str(bundle_dir), "--images", str(extra)]
    if operation == "remove":
        return ["remove", "--root", str(root), "--id", str(doomed)]
    return ["compact", "--root", str(root)]


@pytest.mark.parametrize(
    ("operation", "point"),
    [
        ("add", "publish_segment"),
        ("add", "publish_version"),
        ("remove", "publish_version"),
        ("compact", "publish_version"),
    ],
)
def test_kill_9_during_a_write_loses_nothing_and_a_rerun_publishes_the_same(
    operation, point, base, extra, bundle_dir, tmp_path
):
    reference = prepared(base, extra, bundle_dir, tmp_path / "reference", operation)
    root = prepared(base, extra, bundle_dir, tmp_path / "root", operation)
    doomed = sorted(live(root))[-1]
    before, served = live(root), layout.read_current(root)
    extra_args = JOB_ARGS if operation == "add" else []
    assert cli.main(command_of(operation, reference, bundle_dir, extra, doomed) + extra_args) == 0
    killed_at(point, command_of(operation, root, bundle_dir, extra, doomed) + extra_args)
    assert layout.read_current(root) == served and live(root) == before  # nothing lost
    if point == "publish_version" and operation != "remove":  # its segment, listed by none
        assert unlisted_segments(root)
    assert cli.main(command_of(operation, root, bundle_dir, extra, doomed) + extra_args) == 0
    assert_same(live(root), live(reference))
    assert not unlisted_segments(root)  # the killed write's segment pruned
    assert verify(root).ok, verify(root).problems
