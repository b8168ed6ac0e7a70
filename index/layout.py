"""The on-disk layout of an index root, its versions and the atomic CURRENT pointer.

    ROOT/
      CURRENT                  name of the version being served, e.g. "000003" (switched atomically)
      versions/000001/ ...     one immutable directory per build/add/remove/merge
      versions/.tmp-000004-PID a version being written (never served; removed by the next writer)
      staging/FINGERPRINT/     embeddings of an unfinished job, by content hash (resume)
      .lock                    held (flock) by the one process writing this root

A version directory is complete before it is renamed into place, and CURRENT names it only after
that, so a reader sees the old version or the new one, never a half-written one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import IndexLockedError, IndexStoreError, NoIndexError

CURRENT_NAME = "CURRENT"
VERSIONS_DIR = "versions"
STAGING_DIR = "staging"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
VERSION_DIGITS = 6
# Published versions kept by default (the current one and the ones before it, for readers still
# holding them open and for rolling back by editing CURRENT).
KEEP_VERSIONS = 3


def versions_dir(root: Path) -> Path:
    return Path(root) / VERSIONS_DIR


def staging_dir(root: Path, fingerprint: str) -> Path:
    return Path(root) / STAGING_DIR / fingerprint


def read_current(root: Path) -> str | None:
    """The version name CURRENT points at, or None when nothing was published yet."""
    try:
        name = (Path(root) / CURRENT_NAME).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def current_version_dir(root: Path) -> Path:
    """The directory of the version being served; a clear error when there is none."""
    root = Path(root)
    name = read_current(root)
    if name is None:
        if not root.exists():
            raise NoIndexError(f"no index at {root}: build one with `convirt index build`")
        raise NoIndexError(
            f"{root} has no published index version ({CURRENT_NAME} missing): "
            "build one with `convirt index build --out ROOT`"
        )
    directory = versions_dir(root) / name
    if not directory.is_dir():
        raise IndexStoreError(
            f"{root}/{CURRENT_NAME} names version {name}, but {directory} does not exist: "
            "point CURRENT at an existing version or rebuild"
        )
    return directory


def list_versions(root: Path) -> list[str]:
    folder = versions_dir(root)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def next_version_name(root: Path) -> str:
    existing = [int(name) for name in list_versions(root)]
    return str(max(existing, default=0) + 1).zfill(VERSION_DIGITS)


def new_tmp_dir(root: Path, name: str) -> Path:
    folder = versions_dir(root) / f"{TMP_PREFIX}{name}-{os.getpid()}"
    folder.mkdir(parents=True)
    return folder


def remove_tmp_dirs(root: Path) -> list[Path]:
    """Remove versions left half-written by a crashed writer (call with the write lock held)."""
    folder = versions_dir(root)
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def publish_version(root: Path, tmp_dir: Path, name: str) -> Path:
    """Rename a complete tmp dir into versions/NAME, then switch CURRENT to it."""
    fsync_tree(tmp_dir)
    target = versions_dir(root) / name
    os.rename(tmp_dir, target)
    fsync_dir(target.parent)
    switch_current(root, name)
    return target


def switch_current(root: Path, name: str) -> None:
    """Point CURRENT at a version atomically: write a temp file, fsync, os.replace."""
    root = Path(root)
    tmp = root / f".{CURRENT_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / CURRENT_NAME)
    fsync_dir(root)


def prune_versions(root: Path, keep: int) -> list[str]:
    """Delete the oldest versions before CURRENT so that at most `keep` remain up to it."""
    current = read_current(root)
    if current is None or keep < 1:
        return []
    older = [name for name in list_versions(root) if name < current]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for name in doomed:
        shutil.rmtree(versions_dir(root) / name, ignore_errors=True)
    return doomed


@contextmanager
def write_lock(root: Path) -> Iterator[None]:
    """Exclusive right to write ROOT; released by the OS even if the process is killed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise IndexLockedError(
                f"another index job is writing {root} (it holds {root / LOCK_NAME}): "
                "wait for it to finish, then run this again"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
