"""A persistent cache of decoded images, each shrunk to a resize side: decoded once, then read by
every training run, resume, evaluation and rank.

Layout of a cache folder (default: $CONVIRT_CACHE_DIR/images, else ~/.cache/convirt/images), in a
subfolder per decoder revision (`decoder-3/`: images decoded by other rules are another cache):

    cache.sqlite   files:    path, size, mtime_ns -> sha256 (what the file held when hashed)
                   entries:  side, sha256 -> offset, height, width
                   records:  sha256 -> the image's record from its decode (convirt.imagerecord:
                             file size, size as decoded, DICOM header fields, thumbnail)
                   failures: sha256 -> why it cannot be decoded (ImageCache.undecodable)
    side-256.u8    the pixels of every entry of side 256: uint8 greyscale rows, back to back
    .lock          held by the one process that writes

Why one flat file plus an offsets table rather than WebDataset tars: training reads rows in a
seeded random order (each rank its own share, resuming mid-epoch), and a tar is read front to
back. One positional read per image is random access at no cost, needs no library, and leaves
what was read in the kernel's page cache rather than in the process: a run's memory does not
grow with the archive.

Keys are content (sha256) and side: a changed file hashes anew and is decoded again, a moved or
linked one hashes to a known entry and is not, and two manifests that share images share entries.
Pixels are appended and fsynced before their rows are committed, so an unclean stop leaves at
most an uncommitted tail, cut off when the cache is next opened for writing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imageio import DECODER_REVISION
from .imagerecord import ImageRecord
from .paths import cache_dir

log = logging.getLogger(__name__)

DB_NAME = "cache.sqlite"
LOCK_NAME = ".lock"
BUSY_TIMEOUT_S = 600.0
QUERY_CHUNK = 500  # SQLite host parameters per IN (...) query

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    side INTEGER NOT NULL, sha256 TEXT NOT NULL, offset INTEGER NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL,
    PRIMARY KEY (side, sha256)
);
CREATE TABLE IF NOT EXISTS records (
    sha256 TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, width INTEGER NOT NULL,
    height INTEGER NOT NULL, header TEXT NOT NULL, thumbnail BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (sha256 TEXT PRIMARY KEY, reason TEXT NOT NULL);
"""


class CacheError(RuntimeError):
    """The cache folder cannot be used as it is; the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """Where one decoded image lies in its side's pixel file (and, from look-ups, what it is)."""

    offset: int
    height: int
    width: int
    sha256: str = ""


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int


def default_root() -> Path:
    return cache_dir() / "images"


def cache_root(root: str | Path | None) -> Path:
    """Where a cache's files are: `root` (else the default folder), for this decoder revision."""
    folder = Path(root).expanduser() if root else default_root()
    return folder / f"decoder-{DECODER_REVISION}"


def pixel_file(root: Path, side: int) -> Path:
    return root / f"side-{side}.u8"


def _chunks(values: Sequence, size: int = QUERY_CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class ImageCache:
    """One cache folder: look-ups for anyone, writes through `writer()` (one process at a time)."""

    def __init__(self, root: str | Path | None = None):
        self.root = cache_root(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.root / DB_NAME, timeout=BUSY_TIMEOUT_S)
            self.conn.execute("PRAGMA journal_mode=WAL")
            with self.conn:
                self.conn.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise CacheError(
                f"cannot open the image cache at {self.root}: {err}. Point CONVIRT_CACHE_DIR "
                "(or --cache) at a writable folder, or delete a damaged cache to rebuild it"
            ) from err

    def close(self) -> None:
        self.conn.close()

    def hashes_of(self, stats: Sequence[FileStat]) -> list[str | None]:
        """The content hash recorded for each file, or None where it is unknown or has changed."""
        known: dict[str, tuple[int, int, str]] = {}
        for chunk in _chunks([s.path for s in stats]):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT path, size, mtime_ns, sha256 FROM files WHERE path IN ({marks})"
            known |= {row[0]: row[1:] for row in self.conn.execute(query, chunk)}
        out = []
        for s in stats:
            row = known.get(s.path)
            out.append(row[2] if row and row[0] == s.size and row[1] == s.mtime_ns else None)
        return out

    def entries(self, side: int, hashes: Iterable[str]) -> dict[str, Entry]:
        found = {}
        for chunk in _chunks(sorted(set(hashes))):
            marks = ",".join("?" * len(chunk))
            query = (
                "SELECT sha256, offset, height, width FROM entries "
                f"WHERE side = ? AND sha256 IN ({marks})"
            )
            for sha, offset, height, width in self.conn.execute(query, [side, *chunk]):
                found[sha] = Entry(offset, height, width, sha)
        return found

    def record(self, sha256: str) -> ImageRecord | None:
        """The record its decode left of a content, or None where it was not decoded."""
        row = self.conn.execute(
            "SELECT size_bytes, width, height, header, thumbnail FROM records WHERE sha256 = ?",
            (sha256,),
        ).fetchone()
        if row is None:
            return None
        size, width, height, header, thumbnail = row
        return ImageRecord(sha256, size, width, height, json.loads(header), bytes(thumbnail))

    def undecodable(self, hashes: Iterable[str]) -> dict[str, str]:
        """{sha256: why} of the contents among `hashes` that cannot be decoded (remembered)."""
        found = {}
        for chunk in _chunks(sorted(set(hashes))):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT sha256, reason FROM failures WHERE sha256 IN ({marks})"
            found |= dict(self.conn.execute(query, chunk))
        return found

    def reader(self, side: int) -> CacheReader:
        return CacheReader(pixel_file(self.root, side))

    def writer(self) -> CacheWriter:
        return CacheWriter(self)

    def info(self) -> dict:
        """Counts and sizes per side, for `convirt cache info`."""
        sides = {}
        for side, count, pixels in self.conn.execute(
            "SELECT side, COUNT(*), SUM(height * width) FROM entries GROUP BY side ORDER BY side"
        ):
            path = pixel_file(self.root, side)
            sides[side] = {
                "images": count,
                "bytes": path.stat().st_size if path.exists() else 0,
                "committed_bytes": pixels,
            }
        (files,) = self.conn.execute("SELECT COUNT(*) FROM files").fetchone()
        (undecodable,) = self.conn.execute("SELECT COUNT(*) FROM failures").fetchone()
        return {"root": str(self.root), "files": files, "failures": undecodable, "sides": sides}


class CacheReader:
    """Reads entries of one side by position. Picklable: a loader worker opens its own handle."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._opening = threading.Lock()

    def read(self, entry: Entry) -> np.ndarray:
        """The entry's pixels as a fresh, writable height x width uint8 array (thread-safe)."""
        if self._fd is None:
            with self._opening:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        pixels = np.empty((entry.height, entry.width), np.uint8)
        if os.preadv(self._fd, [pixels], entry.offset) != pixels.nbytes:
            raise CacheError(
                f"{self.path} ends before the entry at byte {entry.offset}: the cache is damaged; "
                "delete its folder and run again to rebuild it"
            )
        return pixels

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class CacheWriter:
    """The one writer of a cache folder: holds its lock, appends pixels, commits rows.

    Opening it cuts each pixel file back to its committed length (what a killed writer left).
    """

    def __init__(self, cache: ImageCache):
        self.cache = cache
        self.conn = cache.conn
        self._lock = open(cache.root / LOCK_NAME, "a+")  # noqa: SIM115 (held until close)
        self._acquire_lock()
        self._files: dict[int, object] = {}
        self._ends: dict[int, int] = {}
        self._pending_entries: list[tuple] = []
        self._pending_records: list[tuple] = []
        self._pending_undecodable: list[tuple[str, str]] = []
        self._cut_uncommitted_tails()

    def _acquire_lock(self) -> None:
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing the image cache %s", self.cache.root)
            started = time.monotonic()
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            log.info("image cache free after %.0f s", time.monotonic() - started)

    def _committed_end(self, side: int) -> int:
        (end,) = self.conn.execute(
            "SELECT COALESCE(MAX(offset + height * width), 0) FROM entries WHERE side = ?", (side,)
        ).fetchone()
        return end

    def _cut_uncommitted_tails(self) -> None:
        for path in self.cache.root.glob("side-*.u8"):
            side = int(path.stem.removeprefix("side-"))
            end = self._committed_end(side)
            if path.stat().st_size > end:
                log.info("image cache: dropping an unfinished tail of %s", path.name)
                os.truncate(path, end)

    def record_hashes(self, rows: Sequence[tuple[FileStat, str]]) -> None:
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                [(s.path, s.size, s.mtime_ns, sha) for s, sha in rows],
            )

    def append(self, side: int, pixels: np.ndarray, record: ImageRecord) -> Entry:
        """Write one image's pixels at the end of its side's file, and its record; returns its
        Entry (both visible to others once committed)."""
        if side not in self._files:
            path = pixel_file(self.cache.root, side)
            self._files[side] = open(path, "ab")  # noqa: SIM115 (closed in close())
            self._ends[side] = self._committed_end(side)
        height, width = pixels.shape
        entry = Entry(self._ends[side], height, width, record.sha256)
        self._files[side].write(np.ascontiguousarray(pixels, np.uint8).tobytes())
        self._ends[side] += pixels.nbytes
        self._pending_entries.append((side, record.sha256, entry.offset, height, width))
        self._pending_records.append(
            (
                record.sha256,
                record.size_bytes,
                record.width,
                record.height,
                json.dumps(record.header, sort_keys=True),
                record.thumbnail,
            )
        )
        return entry

    def remember_undecodable(self, sha256: str, reason: str) -> None:
        self._pending_undecodable.append((sha256, reason))

    def commit(self) -> None:
        """Make every appended image durable, then visible: pixels fsynced before their rows."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        with self.conn:
            self.conn.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?)", self._pending_entries
            )
            self.conn.executemany(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?)", self._pending_records
            )
            self.conn.executemany(
                "INSERT OR REPLACE INTO failures VALUES (?, ?)", self._pending_undecodable
            )
        self._pending_entries, self._pending_records, self._pending_undecodable = [], [], []

    @property
    def pending(self) -> int:
        return len(self._pending_entries) + len(self._pending_undecodable)

    def close(self) -> None:
        """Commit what is pending, then always release the files and the lock (a failed commit,
        a full disk say, leaves only an uncommitted tail, cut off by the next writer)."""
        try:
            self.commit()
        finally:
            for f in self._files.values():
                f.close()
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
