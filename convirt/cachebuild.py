"""Filling the image cache: hash and decode on every core, in processes, in a fixed order.

`resolve` turns manifest items into cache entries, hashing files it has not seen (or that have
changed) and decoding content the cache lacks. A file is read twice at most: once hashed, once
decoded; the decode also makes the image's record (convirt.imagerecord), kept with its pixels. Work goes to a process pool (decoding is CPU
bound; threads would share one interpreter lock) and results are consumed in input order, so
entries are appended in the same order whether a build runs once or is killed and run again:
the resumed cache ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Container, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .hashing import sha256_file
from .imagecache import CacheError, CacheWriter, Entry, FileStat, ImageCache
from .imageio import (
    DICOM_PREAMBLE,
    DICOM_SUFFIXES,
    ImageDecodeError,
    load_image,
    looks_like_dicom,
    resize_shorter,
)
from .imagerecord import ImageRecord, shrink_to_thumbnail
from .manifest import ManifestItem, Skip

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 1024  # manifest rows looked up (and their misses filled) at a time
COMMIT_EVERY = 256  # decoded images per commit: the most a kill loses
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent ends


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class BuildCounts:
    rows: int = 0
    hashed: int = 0
    decoded: int = 0
    undecodable: int = 0
    skipped: list[Skip] = field(default_factory=list)


def hash_file(path: str) -> str | Skip:
    """sha256 of a file's bytes (runs in a worker process)."""
    try:
        return sha256_file(path)
    except OSError as err:
        return Skip(path, f"cannot read the file: {err.strerror or err}")


def decode_file(path: str, side: int, sha256: str) -> tuple[np.ndarray, ImageRecord] | str | Skip:
    """Decode (DICOM rules included) and shrink to `side`: the pixels (height x width uint8,
    shorter side = `side`) and the image's record, from the one read of the file. A reason string
    when the content cannot be decoded (remembered); a Skip when the file could not be read as it
    was hashed (a read error, a file changing under us: this run only, never remembered)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return Skip(path, f"cannot read the file: {err.strerror or err}")
    if hashlib.sha256(data).hexdigest() != sha256:
        return Skip(path, "the file changed while it was read: run again to take the new content")
    if not data:
        return "empty file (0 bytes)"
    size = len(data)  # the file's, before any preamble is put in front
    if Path(path).suffix.lower() in DICOM_SUFFIXES and not looks_like_dicom(data[:132]):
        data = DICOM_PREAMBLE + data  # a data set saved without the file preamble
    try:
        image = load_image(data)  # from memory: every error now is the content's
    except (ImageDecodeError, OSError) as err:
        return str(err)
    pixels = np.asarray(resize_shorter(image, side), dtype=np.uint8)
    # a very large JPEG is decoded at reduced scale: its size is then the file's own, in info
    width, height = image.info.get("source_size", image.size)
    header = image.info.get("header", {})
    record = ImageRecord(sha256, size, width, height, header, shrink_to_thumbnail(image))
    return pixels, record


def _decode_task(task: tuple[str, int, str]) -> tuple[np.ndarray, ImageRecord] | str | Skip:
    return decode_file(*task)


class Resolver:
    """Manifest items in, (item, entry) or Skip out, in order; fills the cache as it goes."""

    def __init__(
        self,
        cache: ImageCache,
        side: int,
        workers: int | None = None,
        progress: bool = True,
        desc: str = "caching images",
        have: Container[str] = frozenset(),
    ):
        """`have`: contents the caller needs no pixels of (already embedded, say): not decoded,
        and passed on as an Entry that holds only their sha256."""
        self.cache, self.side, self.have = cache, side, have
        self.workers = workers or default_workers()
        self.progress, self.desc = progress, desc
        self.counts = BuildCounts()
        self._pool: ProcessPoolExecutor | None = None
        self._writer: CacheWriter | None = None

    def resolve(
        self, items: Iterable[ManifestItem | Skip]
    ) -> Iterator[tuple[ManifestItem, Entry] | Skip]:
        source, bar = iter(items), None
        try:
            while chunk := list(islice(source, ROWS_PER_CHUNK)):
                # made once rows come: a manifest that cannot be read leaves no empty bar behind
                if bar is None:
                    bar = tqdm(
                        desc=self.desc, unit="img", disable=not self.progress, dynamic_ncols=True
                    )
                resolved = self._resolve_chunk(chunk)
                self._close_writer()  # between chunks: other builds (shards, ranks) take turns
                yield from resolved
                bar.update(len(chunk))
                bar.set_postfix(decoded=self.counts.decoded, refresh=False)
        finally:
            if bar is not None:
                bar.close()
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _resolve_chunk(
        self, chunk: list[ManifestItem | Skip]
    ) -> list[tuple[ManifestItem, Entry] | Skip]:
        self.counts.rows += len(chunk)
        stats: dict[int, FileStat] = {}
        out: list = list(chunk)
        for i, item in enumerate(chunk):
            if isinstance(item, ManifestItem):
                stat = _stat(item)
                if isinstance(stat, Skip):
                    out[i] = stat
                else:
                    stats[i] = stat
        hashes = self._hashes(stats)
        for i, sha in hashes.items():
            if isinstance(sha, Skip):
                out[i] = sha
        found = self._entries({i: sha for i, sha in hashes.items() if isinstance(sha, str)}, stats)
        for i, result in found.items():
            out[i] = (
                (chunk[i], result) if isinstance(result, Entry) else Skip(stats[i].path, result)
            )
        self.counts.skipped += [s for s in out if isinstance(s, Skip)]
        return out

    def _hashes(self, stats: dict[int, FileStat]) -> dict[int, str | Skip]:
        keys = list(stats)
        known = self.cache.hashes_of([stats[i] for i in keys])
        unknown = [i for i, sha in zip(keys, known, strict=True) if sha is None]
        if unknown and self._writer is None:
            self._open_writer()
            known = self.cache.hashes_of([stats[i] for i in keys])  # another writer may have
            unknown = [i for i, sha in zip(keys, known, strict=True) if sha is None]
        out: dict[int, str | Skip] = dict(zip(keys, known, strict=True))
        if unknown:
            results = self._map(hash_file, [stats[i].path for i in unknown])
            out |= dict(zip(unknown, results, strict=True))
            self._writer.record_hashes(
                [(stats[i], out[i]) for i in unknown if isinstance(out[i], str)]
            )
            self.counts.hashed += len(unknown)
        return out

    def _entries(
        self, hashes: dict[int, str], stats: dict[int, FileStat]
    ) -> dict[int, Entry | str]:
        """Each row's entry, decoding the content the cache lacks; a reason where it cannot."""
        entries = self.cache.entries(self.side, hashes.values())
        reasons = self.cache.undecodable(set(hashes.values()) - set(entries))
        for sha in {sha for sha in hashes.values() if sha in self.have} - set(entries):
            entries[sha] = Entry(-1, 0, 0, sha)  # no pixels: the caller has what it needs
        to_decode = [i for i, sha in hashes.items() if sha not in entries and sha not in reasons]
        if to_decode and self._writer is None:
            self._open_writer()
            return self._entries(hashes, stats)
        first: dict[str, int] = {}
        for i in to_decode:
            first.setdefault(hashes[i], i)
        if first:
            self._decode(first, stats, entries, reasons)
        return {i: entries.get(sha) or reasons[sha] for i, sha in hashes.items()}

    def _decode(self, first: dict[str, int], stats, entries: dict, reasons: dict) -> None:
        tasks = [(stats[i].path, self.side, sha) for sha, i in first.items()]
        for sha, result in zip(first, self._map(_decode_task, tasks), strict=True):
            if isinstance(result, Skip):  # unread this time: the row is skipped, nothing stored
                reasons[sha] = result.reason
            elif isinstance(result, str):
                self._writer.remember_undecodable(sha, result)
                reasons[sha] = result
                self.counts.undecodable += 1
            else:
                pixels, record = result
                entries[sha] = self._writer.append(self.side, pixels, record)
                self.counts.decoded += 1
            if self._writer.pending >= COMMIT_EVERY:
                self._writer.commit()
        self._writer.commit()

    def _open_writer(self) -> None:
        self._writer = self.cache.writer()

    def _map(self, fn, tasks: Sequence) -> list:
        if self.workers <= 1 or len(tasks) == 1:
            return [fn(t) for t in tasks]
        if self._pool is None:
            # spawn: the workers need no torch, forking a process that runs torch's thread
            # pools can deadlock, and spawned workers are children that can die with us
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent,
                initargs=(os.getpid(),),
            )
        try:
            return list(
                self._pool.map(fn, tasks, chunksize=max(1, len(tasks) // (8 * self.workers)))
            )
        except BrokenProcessPool as err:
            raise CacheError(
                "a decoding process died (a crash inside an image codec?) while working on one of "
                f"{[t[0] if isinstance(t, tuple) else t for t in tasks[:3]]}...: run "
                "`convirt cache build` with --workers 1 to find the file, and move it aside"
            ) from err


def die_with_parent(parent: int) -> None:
    """End this worker when the process that started it ends, even by SIGKILL: otherwise each
    killed build leaves its decoders behind, waiting for work forever (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before prctl took effect
        os._exit(1)


def _stat(item: ManifestItem) -> FileStat | Skip:
    try:
        stat = os.stat(item.path)
    except OSError as err:
        return Skip(str(item.path), f"cannot read the file: {err.strerror or err}")
    return FileStat(str(item.path), stat.st_size, stat.st_mtime_ns)
