"""The embedding job: images come through the image cache, then batches go through the model.

First every item is hashed and, where the cache lacks its content at the model's resize side,
decoded into it by one process per core (convirt.cachebuild): images already decoded by training,
evaluation or an earlier build are not decoded again. Then `workers` threads read the cached
pixels, make the eval view and the thumbnail a bounded number of items ahead of the model, so
that work hides behind the forward pass. Results are consumed in source order: batches, duplicate
detection and staging commits are deterministic, which is what makes a resumed job end identical
to an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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
from convirt.imagecache import CacheReader, Entry, ImageCache, cache_root, pixel_file
from convirt.imageio import DICOM_SUFFIXES, ImageDecodeError, load_image, looks_like_dicom
from convirt.inference import Embedder
from convirt.manifest import ManifestItem, Skip

from .staging import StagedImage, Staging

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

THUMBNAIL_SIZE = 128  # longest side, pixels
THUMBNAIL_QUALITY = 85
DEFAULT_BATCH_SIZE = 32
DEFAULT_CHUNK_BATCHES = 4  # batches per staging commit: the most a crash can lose
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# DICOM header fields kept as metadata (tag keyword -> metadata name).
DICOM_FIELDS = {
    "Modality": "modality",
    "ViewPosition": "view",
    "BodyPartExamined": "body_part",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "PatientID": "patient_id",
}


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
class Decoded:
    item: ManifestItem
    sha256: str
    size_bytes: int
    width: int
    height: int
    file_meta: dict[str, str]
    thumbnail: bytes
    pixels: torch.Tensor


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
    known_hashes: frozenset[str] = frozenset(),
) -> JobResult:
    """Embed every item whose content is neither staged nor in `known_hashes` into `staging`."""
    started = time.perf_counter()
    staged = frozenset(staging.hashes())
    skip = staged | known_hashes
    side = embedder.bundle.config.resize
    reader = CacheReader(pixel_file(cache_root(settings.cache_dir), side))
    resolved = prefetch(cached(items, side, settings, skip), depth=2 * ROWS_PER_CHUNK)
    # closed on any exit: the prefetch thread, its decoding processes and the file descriptor
    with closing(reader), closing(resolved):
        result, seen = JobResult(), {}
        batch: list[Decoded] = []
        chunk: list[StagedImage] = []
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


def embed_batch(embedder: Embedder, batch: list[Decoded]) -> list[StagedImage]:
    encoder, joint = embedder.embed_pixels(torch.stack([d.pixels for d in batch]))
    return [
        StagedImage(d.sha256, d.size_bytes, d.width, d.height, d.file_meta, d.thumbnail, h, v)
        for d, h, v in zip(batch, encoder, joint, strict=True)
    ]


def cached(
    items: list[ManifestItem], side: int, settings: JobSettings, embedded: frozenset[str]
) -> Iterator[tuple[ManifestItem, Entry] | Skip]:
    """Each item with its cache entry, decoded into the cache first where it was missing, unless
    its content is `embedded` already (then only hashed)."""
    cache = ImageCache(settings.cache_dir)  # opened by the thread that iterates this
    try:
        resolver = Resolver(cache, side, settings.workers, progress=False, have=embedded)
        yield from resolver.resolve(items)
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
    row: tuple[ManifestItem, Entry] | Skip,
    embedder: Embedder,
    reader: CacheReader,
    skip: frozenset[str],
) -> Decoded | Hashed | Skip:
    """What the index stores of one cached image, unless its content is already embedded."""
    if isinstance(row, Skip):
        return row
    item, entry = row
    if entry.sha256 in skip:
        return Hashed(item, entry.sha256)
    try:
        size = item.path.stat().st_size
        with open(item.path, "rb") as f:
            head = f.read(132)
    except OSError as err:
        return Skip(str(item.path), f"cannot read the file: {err.strerror or err}")
    image = Image.fromarray(reader.read(entry), mode="L")
    is_dicom = looks_like_dicom(head) or item.path.suffix.lower() in DICOM_SUFFIXES
    return Decoded(
        item,
        entry.sha256,
        size,
        entry.source_width,
        entry.source_height,
        dicom_fields(item.path) if is_dicom else {},
        thumbnail_of(image, item),
        embedder.preprocess(image),  # the cached image is already at the resize side
    )


def thumbnail_of(cached: Image.Image, item: ManifestItem) -> bytes:
    """From the cached copy, unless the model's resize side is smaller than a thumbnail."""
    if max(cached.size) >= THUMBNAIL_SIZE:
        return make_thumbnail(cached)
    try:
        return make_thumbnail(load_image(item.path))
    except ImageDecodeError:
        return make_thumbnail(cached)


def make_thumbnail(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    small = image.copy()
    small.thumbnail((size, size), Image.BILINEAR)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def dicom_fields(path: Path) -> dict[str, str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # the pixels decoded, so a header problem only costs metadata
        return {}
    return {name: str(ds.get(tag)) for tag, name in DICOM_FIELDS.items() if ds.get(tag)}


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
