"""Embedding writes: build (a whole source into a new version), add, and update (add and remove in
one version, what a sync publishes).

Every operation runs inside `write.template.writing`: it holds ROOT/.lock, assembles the new
version in a tmp directory, switches CURRENT only once it is complete, prunes old versions and
summarises. Embedding goes through the staging area (by content hash), so a killed build or add,
run again, embeds only what it had not committed yet. A source may be remote (index/sources/): it
fetches into the staging area first and names its images by URL (`Source.name_of`). remove and
reindex are in write/rewrite.py, merge in write/merge.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from convirt.bundle import Bundle, load_bundle
from convirt.inference import Embedder
from convirt.manifest import Skip

from .. import faiss_index, layout
from ..errors import IndexStoreError, check_fingerprint
from ..metadata import content_id
from ..sources.base import Source
from ..version import SPACES
from . import compact, rows, segments
from .embedding import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_BATCHES,
    DEFAULT_WORKERS,
    JobResult,
    JobSettings,
    run_job,
)
from .rows import duplicate_rows, insert_new
from .staging import Staging
from .template import Summary, Write, writing

log = logging.getLogger(__name__)


@dataclass
class Options:
    index_type: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = DEFAULT_WORKERS
    chunk_batches: int = DEFAULT_CHUNK_BATCHES
    device: str = "cpu"
    progress: bool = True
    keep: int = layout.KEEP_VERSIONS
    cache_dir: Path | None = None  # the image cache (default: $CONVIRT_CACHE_DIR/images)
    ram_budget: int | None = None  # bytes `auto` may fill (index.faiss_index.choose_auto)

    def job_settings(self) -> JobSettings:
        return JobSettings(
            self.batch_size, self.workers, self.chunk_batches, self.progress, self.cache_dir
        )


ModelLike = Bundle | str | Path


def build(
    root: str | Path,
    model: ModelLike,
    source: Source,
    options: Options | None = None,
    shard: tuple[int, int] | None = None,
) -> Summary:
    """Embed a whole source into a new version of `root` (a shard root when `shard` is given)."""
    options = options or Options()
    index_type = None if shard else options.index_type
    with writing(root, "build", keep=options.keep) as w:
        bundle = load_model(model, options.device)
        embedder = Embedder(bundle, options.device, options.batch_size)
        w.embed_texts = text_vectors(embedder, options.progress)
        check_index_type(index_type, embedder)
        if shard is not None:
            source = source.shard(*shard)
        w.needs(lambda: new_bytes(source, embedder))
        staging = w.staging(open_staging(w.root, embedder))
        source = source.fetch(staging.directory, options.progress)
        job = run_job(source.items, embedder, staging, options.job_settings())
        if shard is None:
            refuse_empty(source, job)
        ids, vectors = insert_new(w.meta, job.kept, staging, source)
        rows.insert_duplicates(w.meta, duplicate_rows(job, source))
        skipped = skips(job, source)
        extra = source.finish(w.meta, skipped)
        outcome = job_outcome(job, skipped, w.meta, source, extra)
        info = {
            **model_info(bundle),
            "source": source.describe(),
            "shard": {"index": shard[0], "count": shard[1]} if shard else None,
            "ram_budget": options.ram_budget,
            **job_info(job, skipped, w.meta),
            **source.source_info({}),
        }
        w.publish(vectors, ids, info, outcome, index_type)
    return w.summary


def add(
    root: str | Path, model: ModelLike, source: Source, options: Options | None = None
) -> Summary:
    """Embed the new images of `source` into one new segment of a new version (old segments are
    listed, not copied), then let the compaction policy merge small segments."""
    options = options or Options()
    with writing(root, "add", from_current=True, keep=options.keep) as w:
        update(w, source, options, embedder_for(w, model, options))
    w.summary.compaction = compact.by_policy(root, options.keep)
    return w.summary


def update(
    w: Write,
    source: Source,
    options: Options,
    embedder: Embedder | None,
    drop: Sequence[str] = (),
) -> None:
    """Publish w.current plus the new images of `source`, minus the images stored under the
    paths in `drop` (what a remote source no longer holds), as one new segment (write/segments.py)
    and a version listing it after the current segments. Without an embedder, `source` must
    have nothing to embed (a sync that only removes)."""
    current = w.current
    listing = segments.Listing.of(current)
    w.needs(lambda: new_bytes(source, embedder) if embedder else 0)
    w.reuse_from = [f.directory for f in listing.files]
    staging = None
    if embedder is not None:
        staging = w.staging(open_staging(w.root, embedder))
        source = source.fetch(staging.directory, options.progress)
        known = listing.live_content()  # looked up per image, not read into a set
        job = run_job(source.items, embedder, staging, options.job_settings(), known)
    elif source.items:
        raise IndexStoreError("internal error: images to embed, but no model to embed them")
    else:
        job = JobResult()
    # only the paths and ids this write names are looked up: its cost follows what it adds
    named = [(source.name_of(item.path), sha) for item, sha in job.kept]
    by_path = listing.ids_of_paths([name for name, _ in named] + list(drop))
    replaced = sorted({by_path[name] for name, _ in named if name in by_path})
    known_paths = listing.paths_of_ids(content_id(sha) for _, sha in job.known)
    already = [
        name
        for item, sha in job.known
        if known_paths.get(content_id(sha)) == (name := source.name_of(item.path))
    ]
    dropped = sorted({by_path[path] for path in drop if path in by_path})
    gone = replaced + dropped
    touched = touched_segments(listing, source, [sha for _, sha in named], drop, named)
    old_ids, old_vectors = segments.gather(w, listing, touched, gone)
    if drop:
        rows.forget_duplicate_paths(w.meta, drop)
        rows.forget_skipped(w.meta, drop)
    new_ids, new_vectors = insert_new(w.meta, job.kept, staging, source, current)
    found = duplicate_rows(job, source, already)  # of an earlier segment's image: its path
    paths_of = listing.paths_of_ids(i for _, i, _ in found)
    rows.insert_duplicates(w.meta, [(p, i, of or paths_of.get(i, "")) for p, i, of in found])
    ids = np.concatenate([old_ids, new_ids])
    vectors = {space: np.concatenate([old_vectors[space], new_vectors[space]]) for space in SPACES}
    skipped = skips(job, source)
    extra = source.finish(w.meta, skipped)
    outcome = job_outcome(job, skipped, w.meta, source, extra)
    outcome["counts"].update(replaced=len(replaced), already_indexed=len(already))
    if drop:
        outcome["counts"]["removed"] = len(dropped)
        outcome["removed"] = sorted(path for path in drop if path in by_path)
    outcome.update(added=[name for name, _ in named], already_indexed=already)
    info = {
        **segments.segment_info(current),
        "added_from": source.describe(),
        **job_info(job, skipped, w.meta),
        **source.source_info(current.info),
    }
    if options.ram_budget is not None:
        info["ram_budget"] = options.ram_budget
    segment = None
    if len(ids) or touched:
        kind = segments.segment_index_type(current.info.get("index_type"), len(ids))
        segment = w.publish(vectors, ids, info, outcome, kind, as_segment=True)
    segments.publish_listing(w, listing, touched, segment, gone, info, outcome)


def touched_segments(
    listing: segments.Listing,
    source: Source,
    shas: Sequence[str],
    drop: Sequence[str],
    named: Sequence[tuple[str, str]],
) -> set[int]:
    """The segments a write must rewrite (immutable, they cannot change in place): those holding
    an id being added again (removed earlier), a duplicate path or remembered skip of `drop`,
    a remembered skip now indexed, or rows the source changes (a PACS report joined later)."""
    touched = listing.holding(content_id(sha) for sha in shas)
    touched |= listing.with_paths("duplicates", drop)
    touched |= listing.with_paths(rows.SKIPPED_TABLE, [*drop, *(name for name, _ in named)])
    for position, files in enumerate(listing.files):
        if position not in touched and source.changes_rows(files.meta_path):
            touched.add(position)
    return touched


def embedder_for(w: Write, model: ModelLike, options: Options) -> Embedder:
    """The model of w.current (refusing any other bundle), ready to embed."""
    bundle = load_model(model, options.device)
    check_fingerprint(
        f"index {w.root} (version {w.current.name})", w.current.fingerprint, bundle.fingerprint
    )
    embedder = Embedder(bundle, options.device, options.batch_size)
    w.embed_texts = text_vectors(embedder, options.progress)
    return embedder


SENTENCE_CHUNK = 512  # report sentences per progress step (shortest first, as the encoder likes)


def text_vectors(
    embedder: Embedder, progress: bool = True
) -> Callable[[Sequence[str]], np.ndarray]:
    """Report sentences -> joint-space vectors, with a progress bar: a large archive's sentences
    take minutes on a CPU, after the images' bar has reached 100%."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        order = np.argsort([len(text) for text in texts], kind="stable")
        vectors = np.zeros((len(texts), embedder.dim), np.float32)
        with tqdm(total=len(texts), desc="sentences", unit="sent", disable=not progress) as bar:
            for first in range(0, len(order), SENTENCE_CHUNK):
                chunk = order[first : first + SENTENCE_CHUNK]
                vectors[chunk] = embedder.embed_texts([texts[i] for i in chunk]).vectors
                bar.update(len(chunk))
        log.info("embedded %d report sentences in %.1fs", len(texts), time.perf_counter() - started)
        return vectors

    return embed


# -- helpers -------------------------------------------------------------------------------------
# Roughly what one image's metadata row takes (paths, report, metadata and its JPEG thumbnail).
ROW_BYTES = 8 * 1024


def new_bytes(source: Source, embedder: Embedder) -> int:
    """About the disk space embedding a source takes: staged once, then written into a version
    (.npy vectors, flat FAISS indexes and a metadata row with a thumbnail, both times)."""
    vector = 4 * (embedder.dim + embedder.image_feature_dim)
    return len(source.items) * (3 * vector + 2 * ROW_BYTES)


def load_model(model: ModelLike, device: str) -> Bundle:
    return model if isinstance(model, Bundle) else load_bundle(model, device)


def model_info(bundle: Bundle) -> dict[str, Any]:
    return {
        "fingerprint": bundle.fingerprint,
        "model": {
            "path": str(bundle.path) if bundle.path else None,
            "image_encoder": bundle.config.image_encoder,
            "image_size": bundle.config.image_size,
        },
    }


def job_info(job: JobResult, skipped: list[Skip], conn) -> dict[str, Any]:
    return {
        "embed_seconds": round(job.seconds, 3),
        "skipped": len(skipped),
        "duplicates": len(rows.duplicate_entries(conn)),
    }


def job_outcome(
    job: JobResult,
    skipped: list[Skip],
    conn,
    source: Source,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """build_report.json of an embedding job; `extra` (from the source) adds counts and keys."""
    repeated = sorted(
        name
        for d in job.duplicates
        if (name := source.name_of(d.item.path)) == source.name_of(d.first)
    )
    extra = dict(extra or {})
    return {
        "counts": {
            "embedded": job.embedded,
            "resumed": job.resumed,
            "skipped": len(skipped),
            "duplicates": len(job.duplicates),
            **extra.pop("counts", {}),
        },
        "skipped": [s.as_dict() for s in skipped],
        "duplicates": rows.duplicate_entries(conn),
        "repeated_rows": repeated,
        **extra,
    }


def skips(job: JobResult, source: Source) -> list[Skip]:
    """What the job and the source left out, by the names the index uses, sorted."""
    named = [Skip(source.name_of(s.path), s.reason) for s in job.skipped]
    return sorted(named + source.skipped, key=lambda s: s.path)


def refuse_empty(source: Source, job: JobResult) -> None:
    """An index of nothing would replace a useful one: say why nothing could be indexed."""
    if job.kept:
        return
    where = source.location
    if not source.items and source.kind not in ("images", "manifest"):
        reasons = sorted({s.reason for s in source.skipped})[:3]
        raise IndexStoreError(
            f"no images found in {where}: {len(source.skipped)} items that cannot be indexed "
            f"({'; '.join(reasons) or 'none listed'}); the current version is unchanged"
        )
    if not source.items:
        raise IndexStoreError(
            f"no images found in {where} (PNG, JPEG, DICOM; {len(source.skipped)} manifest rows "
            "name missing files): check the path"
        )
    reasons = sorted({s.reason for s in job.skipped})[:3]
    raise IndexStoreError(
        f"none of the {len(source.items)} images in {where} could be read "
        f"({'; '.join(reasons)}); the current version is unchanged"
    )


def check_index_type(index_type: str | None, embedder: Embedder) -> None:
    if index_type is None:
        return
    faiss_index.check_index_type(index_type, embedder.dim)
    faiss_index.check_index_type(index_type, embedder.image_feature_dim)


def open_staging(root: Path, embedder: Embedder) -> Staging:
    fingerprint = embedder.bundle.fingerprint
    dims = (embedder.image_feature_dim, embedder.dim)
    return Staging(layout.staging_dir(root, fingerprint), fingerprint, dims)
