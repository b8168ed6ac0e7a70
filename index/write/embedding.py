"""The embedding job: images come through the image cache, then batches go through the model.

First every item is hashed and, where the cache lacks its content at the model's resize side,
decoded into it by one process per core (convirt.cachebuild): images already decoded by training,
evaluation or an earlier build are not decoded again. That one decode made the image's record
(convirt.imagerecord: sizes, DICOM header fields, thumbnail), kept in the cache; the job takes it
from there, adds the vectors and stages it: the image file is not opened again. `workers` threads
read the cached pixels and make the eval view a bounded number of items ahead of the model, so
that work hides behind the forward pass. Results are consumed in source order: batches, duplicate
detection and staging commits are deterministic, which is what makes a resumed job end identical
to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from queue import Full, Queue
from typing import TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from convirt.cachebuild import ROWS_PER_CHUNK, Resolver
from convirt.imagecache import CacheError, CacheReader, Entry, ImageCache, cache_root, pixel_file
from convirt.imagerecord import ImageRecord
from convirt.inference import Embedder
from convirt.manifest import ManifestItem, Skip

from .staging import Staging

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BATCH_SIZE = 32
DEFAULT_CHUNK_BATCHES = 4  # batches per staging commit: the most a crash can lose
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class JobSettings:
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = DEFAULT_WORKERS
    chunk_batches: int = DEFAULT_CHUNK_BATCHES
    progress: bool = True
    cache_dir: Path | None = None  # the image cache (default: $CONVIRT_CACHE_DIR/images)


@dataclass
class Hashed:
    """An image whose content is already embedded (staged, or in the index): not decoded again."""

    item: ManifestItem
    sha256: str


@dataclass
class Ready:
    """An image to embed: its record, as its decode left it in the cache, and the model's view."""

    item: ManifestItem
    record: ImageRecord
    pixels: torch.Tensor

    @property
    def sha256(self) -> str:
        return self.record.sha256


@dataclass
class Duplicate:
    item: ManifestItem
    sha256: str
    first: str  # path of the copy that is kept

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.item.path), "duplicate_of": self.first, "sha256": self.sha256}


@dataclass
class JobResult:
    """What happened to every item, in source order."""

    kept: list[tuple[ManifestItem, str]] = field(default_factory=list)  # (item, sha256) to index
    known: list[tuple[ManifestItem, str]] = field(default_factory=list)  # content already indexed
    duplicates: list[Duplicate] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    embedded: int = 0  # images that went through the model in this run
    resumed: int = 0  # images found in the staging area from an earlier, interrupted run
    seconds: float = 0.0


def run_job(
    items: list[ManifestItem],
    embedder: Embedder,
    staging: Staging,
    settings: JobSettings,
    known_hashes: Container[str] = frozenset(),
) -> JobResult:
    """Embed every item whose content is neither staged nor in `known_hashes` into `staging`
    (a membership test: a version's live contents are looked up, not read into a set)."""
    started = time.perf_counter()
    skip = Contents(frozenset(staging.hashes()), known_hashes)
    side = embedder.bundle.config.resize
    reader = CacheReader(pixel_file(cache_root(settings.cache_dir), side))
    resolved = prefetch(cached(items, side, settings, skip), depth=2 * ROWS_PER_CHUNK)
    # closed on any exit: the prefetch thread, its decoding processes and the file descriptor
    with closing(reader), closing(resolved):
        result, seen = JobResult(), {}
        batch: list[Ready] = []
        chunk: list[ImageRecord] = []
        bar = tqdm(total=len(items), desc="embedding", unit="img", disable=not settings.progress)
        depth = max(2 * settings.batch_size, 4 * settings.workers)
        for outcome in ordered_map(
            lambda row: inspect(row, embedder, reader, skip), resolved, settings.workers, depth
        ):
            bar.update(1)
            bar.set_postfix(new=result.embedded, skipped=len(result.skipped), refresh=False)
            if isinstance(outcome, Skip):
                result.skipped.append(outcome)
                continue
            if outcome.sha256 in seen:
                result.duplicates.append(
                    Duplicate(outcome.item, outcome.sha256, seen[outcome.sha256])
                )
                continue
            seen[outcome.sha256] = str(outcome.item.path)
            if outcome.sha256 in known_hashes:
                result.known.append((outcome.item, outcome.sha256))
                continue
            result.kept.append((outcome.item, outcome.sha256))
            if isinstance(outcome, Hashed):
                result.resumed += 1
                continue
            batch.append(outcome)
            if len(batch) == settings.batch_size:
                chunk += embed_batch(embedder, batch)
                result.embedded += len(batch)
                batch = []
                if len(chunk) >= settings.chunk_batches * settings.batch_size:
                    staging.put(chunk)
                    chunk = []
        if batch:
            chunk += embed_batch(embedder, batch)
            result.embedded += len(batch)
        if chunk:
            staging.put(chunk)
    bar.close()
    result.seconds = time.perf_counter() - started
    return result


def embed_batch(embedder: Embedder, batch: list[Ready]) -> list[ImageRecord]:
    """The batch's records, each given its vectors."""
    encoder, joint = embedder.embed_pixels(torch.stack([ready.pixels for ready in batch]))
    for ready, h, v in zip(batch, encoder, joint, strict=True):
        ready.record.encoder, ready.record.joint = h, v
    return [ready.record for ready in batch]


class Contents:
    """Content hashes (sha256) a job need not decode or embed: those staged by an earlier run of
    it, and those the index holds (any container: index/write/segments.py LiveContent looks
    each one up among a version's live ids instead of reading millions into a set)."""

    def __init__(self, staged: frozenset[str], held: Container[str] = frozenset()):
        self.staged, self.held = staged, held

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self.staged or sha256 in self.held


def cached(
    items: list[ManifestItem], side: int, settings: JobSettings, embedded: Contents
) -> Iterator[tuple[ManifestItem, Entry, ImageRecord | None] | Skip]:
    """Each item with its cache entry and its record, decoded into the cache first where it was
    missing, unless its content is `embedded` already (then only hashed: no record)."""
    cache = ImageCache(settings.cache_dir)  # opened by the thread that iterates this
    try:
        resolver = Resolver(cache, side, settings.workers, progress=False, have=embedded)
        for row in resolver.resolve(items):
            if isinstance(row, Skip):
                yield row
                continue
            item, entry = row
            record = None if entry.sha256 in embedded else cache.record(entry.sha256)
            if record is None and entry.sha256 not in embedded:
                raise CacheError(
                    f"the image cache at {cache.root} holds pixels of {item.path} without their "
                    "record: it is damaged; delete its folder and run again to rebuild it"
                )
            yield item, entry, record
    finally:
        cache.close()


def prefetch(source: Iterator[T], depth: int) -> Iterator[T]:
    """Run a generator in a thread of its own, `depth` items ahead of the consumer: the cache
    fills (in its worker processes) while the model embeds what is ready. A consumer that stops
    early stops the generator too (its finally blocks run, its worker processes end)."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in source:
                if not offer(item):
                    return
            offer(done)
        except BaseException as err:  # handed to the consumer, raised there
            offer(_Failure(err))
        finally:
            source.close()

    thread = threading.Thread(target=produce, name="index-cache", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class _Failure:
    error: BaseException


def inspect(
    row: tuple[ManifestItem, Entry, ImageRecord | None] | Skip,
    embedder: Embedder,
    reader: CacheReader,
    skip: Contents,
) -> Ready | Hashed | Skip:
    """The model's view of one cached image, unless its content is already embedded."""
    if isinstance(row, Skip):
        return row
    item, entry, record = row
    if entry.sha256 in skip:
        return Hashed(item, entry.sha256)
    image = Image.fromarray(reader.read(entry), mode="L")
    return Ready(item, record, embedder.preprocess(image))  # cached at the resize side already


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int) -> Iterator[R]:
    """fn over items in a thread pool, results in input order, at most `depth` items in flight."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="index-decode")
    pending: deque[Future] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
