"""The on-disk layout of an index root, its versions and the atomic CURRENT pointer.

    ROOT/
      CURRENT                  name of the version being served, e.g. "000003" (switched atomically)
      versions/000001/ ...     one immutable directory per build/add/remove/merge
      versions/.tmp-000004-PID a version being written (never served; removed by the next writer)
      segments/000002/         a segment written by add/sync/compact, listed by format-2 versions
                               (the format: index/version.py; named by the version that first
                               published it)
      staging/FINGERPRINT/     embeddings of an unfinished job, by content hash (resume)
      .lock                    held (flock) by the one process writing this root

A version directory is complete before it is renamed into place, and CURRENT names it only after
that, so a reader sees the old version or the new one, never a half-written one. A segment is
renamed into segments/ before the version listing it is published; a writer killed in between
leaves a segment no version lists, which the next prune removes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import DiskFullError, IndexLockedError, IndexStoreError, NoIndexError, reason

CURRENT_NAME = "CURRENT"
VERSIONS_DIR = "versions"
SEGMENTS_DIR = "segments"
STAGING_DIR = "staging"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
VERSION_DIGITS = 6
# Published versions kept by default (the current one and the ones before it, for readers still
# holding them open and for rolling back by editing CURRENT).
KEEP_VERSIONS = 3
# A write that failed with an ambiguous error (SQLite "disk I/O error", a short write) while less
# than this (or less than the operation needs) is free counts as the disk being full.
LOW_SPACE_BYTES = 16 * 2**20
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_WORDS = ("no space left", "disk is full", "disk full", "quota exceeded")
AMBIGUOUS_WORDS = ("disk i/o error", "write", "written", "flush")  # "fwrite" too


def versions_dir(root: Path) -> Path:
    return Path(root) / VERSIONS_DIR


def segments_dir(root: Path) -> Path:
    return Path(root) / SEGMENTS_DIR


def staging_dir(root: Path, fingerprint: str) -> Path:
    return Path(root) / STAGING_DIR / fingerprint


def read_current(root: Path) -> str | None:
    """The version name CURRENT points at, or None when nothing was published yet."""
    path = Path(root) / CURRENT_NAME
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise IndexStoreError(
            f"{path} cannot be read ({type(err).__name__}: {err}): it should hold the name of "
            f"one folder of {versions_dir(root)}; write one there, or publish a new version "
            "(`convirt index build` or `add`)"
        ) from err
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


def list_segments(root: Path) -> list[str]:
    folder = segments_dir(root)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def next_version_name(root: Path) -> str:
    """One more than any version or segment (a segment left by a killed writer included)."""
    existing = [int(name) for name in list_versions(root) + list_segments(root)]
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


def publish_segment(root: Path, tmp_dir: Path, name: str) -> Path:
    """Rename a complete tmp dir into segments/NAME (CURRENT unchanged: a version lists it)."""
    fsync_tree(tmp_dir)
    target = segments_dir(root) / name
    target.parent.mkdir(exist_ok=True)
    os.rename(tmp_dir, target)
    fsync_dir(target.parent)
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
    """Delete the oldest versions before CURRENT so that at most `keep` remain up to it, then
    the segments no remaining version lists (a format-1 version listed as a segment stays)."""
    current = read_current(root)
    if current is None or keep < 1:
        return []
    older = [name for name in list_versions(root) if name < current]
    doomed = older[: max(0, len(older) - (keep - 1))]
    listed = set()
    for name in list_versions(root):
        if name not in doomed:
            listed.update(listed_segments(versions_dir(root) / name))
    for name in doomed:
        if f"{VERSIONS_DIR}/{name}" in listed:  # a segment of a kept version: only its own
            continue  # version.json stays with it (it describes the segment)
        shutil.rmtree(versions_dir(root) / name, ignore_errors=True)
    for name in list_segments(root):
        if f"{SEGMENTS_DIR}/{name}" not in listed:
            shutil.rmtree(segments_dir(root) / name, ignore_errors=True)
    return doomed


def listed_segments(directory: Path) -> list[str]:
    """The segments (paths relative to ROOT) a version directory lists: a format-1 version is
    its own one segment. A version.json that cannot be read lists its own directory only."""
    own = f"{VERSIONS_DIR}/{Path(directory).name}"
    try:
        info = json.loads((Path(directory) / "version.json").read_text())
    except (OSError, ValueError):
        return [own]
    segments = info.get("segments") if isinstance(info, dict) else None
    if info.get("format") == 2 and isinstance(segments, list):
        return [str(s) for s in segments]
    return [own]


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


# -- running out of disk -------------------------------------------------------------------------


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def filesystem_of(path: Path) -> tuple[str, str]:
    """(mount point, device) of the filesystem holding path (or its nearest existing parent)."""
    mount = existing_parent(path)
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = "?"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 2 and fields[1] == str(mount):
                    device = fields[0]  # the last entry for a mount point is the visible one
    except OSError:
        pass
    return str(mount), device


def tree_bytes(path: Path) -> int:
    """Bytes of the files under path (0 when it does not exist)."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def is_disk_full(root: Path, err: BaseException, needed: int) -> bool:
    """Whether a failed write means the disk holding root is full (or over quota).

    ENOSPC/EDQUOT or SQLite's "database or disk is full" say so outright; an ambiguous write
    failure (SQLite "disk I/O error", NumPy's "N requested and M written", a FAISS write error)
    counts when the disk has less free space than the operation needs."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for error in chain:
        if isinstance(error, IndexStoreError):
            continue
        if getattr(error, "errno", None) in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, OSError | sqlite3.Error | RuntimeError):
            text = str(error).lower()
            if any(word in text for word in DISK_FULL_WORDS):
                return True
            if any(word in text for word in AMBIGUOUS_WORDS) and free_bytes(root) < max(
                needed, LOW_SPACE_BYTES
            ):
                return True
    return False


def free_bytes(root: Path) -> int:
    try:
        return shutil.disk_usage(existing_parent(root)).free
    except OSError:
        return 0


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def disk_full_as_error(root: Path, operation: str, needed: Callable[[], int]) -> Iterator[None]:
    """Turn a write that failed for want of space into DiskFullError naming the disk, the space
    needed and the space free. Nothing is published then: CURRENT still names the old version."""
    try:
        yield
    except (OSError, sqlite3.Error, RuntimeError) as err:
        if isinstance(err, IndexStoreError):
            raise
        try:
            estimate = int(needed())
        except Exception:
            estimate = 0
        if not is_disk_full(root, err, estimate):
            raise
        raise disk_full_error(root, operation, estimate, err) from err


def disk_full_error(root: Path, operation: str, needed: int, err: BaseException) -> DiskFullError:
    root = Path(root)
    mount, device = filesystem_of(root)
    usage = shutil.disk_usage(existing_parent(root))
    current = read_current(root) if root.is_dir() else None
    unchanged = f"version {current} is still the current one" if current else "no version yet"
    need = f"about {human(needed)}" if needed else "more than that"
    return DiskFullError(
        f"no space left on the disk holding the index root {root} (filesystem {device} mounted "
        f"at {mount}: {human(usage.free)} free of {human(usage.total)}; this {operation} needs "
        f"{need}): free some space there or move the index root to a larger disk, then run the "
        f"same command again (it resumes). Nothing was published: {unchanged} "
        f"({type(err).__name__}: {reason(err)})"
    )
