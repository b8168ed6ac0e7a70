"""Write operations on an index root: build, add, remove, reindex, merge. Each writes a new version.

Every operation runs inside `version.writing` (the one template of index writes): it holds
ROOT/.lock, assembles the new version in a tmp directory, switches CURRENT only once it is complete,
prunes old versions and summarises. Embedding goes through the staging area (by content hash), so
a killed build or add, run again, embeds only what it had not committed yet. A source may be
remote (DICOMweb, index/dicomweb.py): it fetches into the staging area first and names its images
by URL (`Source.name_of`); `update` is add and remove in one version, what a sync publishes.
Metadata SQL lives in index/metadata.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convirt.bundle import Bundle, load_bundle
from convirt.inference import Embedder
from convirt.manifest import ManifestItem, Skip

from . import faiss_index, layout, metadata
from .embedding import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_BATCHES,
    DEFAULT_WORKERS,
    JobResult,
    JobSettings,
    run_job,
)
from .errors import IndexStoreError, check_fingerprint
from .sources import Source
from .staging import StagedImage, Staging
from .version import SPACES, Summary, VersionFiles, Write, read_version, writing

__all__ = ["Options", "Summary", "add", "build", "merge", "reindex", "remove", "update"]

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
        w.embed_texts = text_vectors(embedder)
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
        metadata.insert_duplicates(w.meta, duplicate_rows(job, source))
        skipped = skips(job, source)
        extra = source.finish(w.meta, skipped)
        report = job_report(job, skipped, w.meta, source, extra)
        info = {
            **model_info(bundle),
            "source": source.describe(),
            "shard": {"index": shard[0], "count": shard[1]} if shard else None,
            **job_info(job, skipped, w.meta),
            **source.version_info({}),
        }
        w.publish(vectors, ids, info, report, index_type)
    return w.summary


def add(
    root: str | Path, model: ModelLike, source: Source, options: Options | None = None
) -> Summary:
    """Embed the new images of `source` and copy every old vector into a new version."""
    options = options or Options()
    with writing(root, "add", from_current=True, keep=options.keep) as w:
        update(w, source, options, embedder_for(w, model, options))
    return w.summary


def update(
    w: Write,
    source: Source,
    options: Options,
    embedder: Embedder | None,
    drop: Sequence[str] = (),
) -> None:
    """Publish w.current plus the new images of `source`, minus the images stored under the
    paths in `drop` (what a remote source no longer holds). Without an embedder, `source` must
    have nothing to embed (a sync that only removes)."""
    current = w.current
    w.needs(lambda: version_bytes(current) + (new_bytes(source, embedder) if embedder else 0))
    with closing(metadata.open_readonly(current.meta_path)) as conn:
        indexed = metadata.hashes_and_paths(conn)
    staging = None
    if embedder is not None:
        staging = w.staging(open_staging(w.root, embedder))
        source = source.fetch(staging.directory, options.progress)
        job = run_job(source.items, embedder, staging, options.job_settings(), frozenset(indexed))
    elif source.items:
        raise IndexStoreError("internal error: images to embed, but no model to embed them")
    else:
        job = JobResult()
    by_path = {path: image_id for image_id, path in indexed.values()}
    named = [(source.name_of(item.path), sha) for item, sha in job.kept]
    replaced = sorted({by_path[name] for name, _ in named if name in by_path})
    already = [
        name for item, sha in job.known if indexed[sha][1] == (name := source.name_of(item.path))
    ]
    dropped = sorted({by_path[path] for path in drop if path in by_path})
    old_ids = current.ids()
    keep = ~np.isin(old_ids, replaced + dropped)
    metadata.copy_from(w.meta, current.meta_path, old_ids[keep], old_ids[keep])
    if drop:
        metadata.forget_duplicate_paths(w.meta, drop)
        metadata.forget_not_indexed(w.meta, drop)
    new_ids, new_vectors = insert_new(w.meta, job.kept, staging, source, current)
    metadata.insert_duplicates(w.meta, duplicate_rows(job, source, already))
    ids = np.concatenate([old_ids[keep], new_ids])
    vectors = {
        space: np.concatenate([current.vectors(space)[keep], new_vectors[space]])
        for space in SPACES
    }
    skipped = skips(job, source)
    extra = source.finish(w.meta, skipped)
    report = job_report(job, skipped, w.meta, source, extra)
    report["counts"].update(replaced=len(replaced), already_indexed=len(already))
    if drop:
        report["counts"]["removed"] = len(dropped)
        report["removed"] = sorted(path for path in drop if path in by_path)
    report.update(added=[name for name, _ in named], already_indexed=already)
    info = {
        **current.info,
        "added_from": source.describe(),
        **job_info(job, skipped, w.meta),
        **source.version_info(current.info),
    }
    w.publish(vectors, ids, info, report, current.info["index_type"])


def embedder_for(w: Write, model: ModelLike, options: Options) -> Embedder:
    """The model of w.current (refusing any other bundle), ready to embed."""
    bundle = load_model(model, options.device)
    check_fingerprint(
        f"index {w.root} (version {w.current.name})", w.current.fingerprint, bundle.fingerprint
    )
    embedder = Embedder(bundle, options.device, options.batch_size)
    w.embed_texts = text_vectors(embedder)
    return embedder


def text_vectors(embedder: Embedder) -> Callable[[Sequence[str]], np.ndarray]:
    """Report sentences -> joint-space vectors, with a progress line for large archives."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        vectors = embedder.embed_texts(list(texts)).vectors
        log.info("embedded %d report sentences in %.1fs", len(texts), time.perf_counter() - started)
        return vectors

    return embed


def remove(
    root: str | Path,
    ids: Iterable[int] = (),
    paths: Iterable[str] = (),
    keep: int = layout.KEEP_VERSIONS,
) -> Summary:
    """A new version without the given images (by id, or by path: absolute or as indexed)."""
    with writing(root, "remove", from_current=True, keep=keep) as w:
        with closing(metadata.open_readonly(w.current.meta_path)) as conn:
            doomed, aliases = resolve_targets(conn, w.root, list(ids), list(paths))
        changes = {"removed": len(doomed), "duplicate paths removed": len(aliases)}
        rewrite(w, doomed, aliases, None, changes)
    return w.summary


def reindex(root: str | Path, index_type: str, keep: int = layout.KEEP_VERSIONS) -> Summary:
    """The same vectors and metadata under another FAISS structure; nothing is re-embedded."""
    with writing(root, "reindex", from_current=True, keep=keep) as w:
        for space, dim in w.current.info["dims"].items():
            check_factory_for(index_type, dim, space)
        rewrite(w, [], [], index_type, {})
    return w.summary


def rewrite(
    w: Write,
    doomed: Sequence[int],
    aliases: Sequence[str],
    index_type: str | None,
    changes: dict[str, int],
) -> None:
    """Publish w.current without the ids `doomed` and the duplicate paths `aliases`."""
    current = w.current
    w.needs(lambda: version_bytes(current))
    old_ids = current.ids()
    keep = ~np.isin(old_ids, np.asarray(doomed, dtype=np.int64))
    metadata.copy_from(w.meta, current.meta_path, old_ids[keep], old_ids[keep])
    metadata.forget_duplicate_paths(w.meta, aliases)
    vectors = {space: current.vectors(space)[keep] for space in SPACES}
    report = {
        "counts": {"removed": len(doomed), "duplicate_paths_removed": len(aliases)},
        "removed_ids": [int(i) for i in doomed],
        "removed_duplicate_paths": list(aliases),
    }
    index_type = index_type or current.info["index_type"]
    w.publish(vectors, old_ids[keep], dict(current.info), report, index_type, changes)


def merge(
    root: str | Path,
    shard_roots: Sequence[str | Path],
    index_type: str = "auto",
    keep: int = layout.KEEP_VERSIONS,
) -> Summary:
    """Join the shards of one sharded build into a version of `root`, equal to a single build."""
    started = time.perf_counter()
    shards = [read_version(layout.current_version_dir(Path(s))) for s in shard_roots]
    check_shards(shards, shard_roots)
    for space, dim in shards[0].info["dims"].items():
        check_factory_for(index_type, dim, space)
    chosen, losers = choose_primaries(shards)
    with writing(root, "merge", keep=keep, started=started) as w:
        w.reuse_from = [shard.directory for shard in shards]
        w.needs(lambda: sum(version_bytes(shard) for shard in shards))
        ids, vectors = copy_shards(w.meta, shards, chosen)
        metadata.insert_duplicates(w.meta, losers)
        metadata.settle_duplicates(w.meta)
        reports = [s.report() for s in shards]
        skipped = sorted(
            (s for r in reports for s in r.get("skipped", [])), key=lambda s: s["path"]
        )
        repeated = sorted(p for r in reports for p in r.get("repeated_rows", []))
        duplicates = metadata.duplicate_entries(w.meta)
        counts = {
            "embedded": sum(r["counts"].get("embedded", 0) for r in reports),
            "resumed": sum(r["counts"].get("resumed", 0) for r in reports),
            "skipped": len(skipped),
            "duplicates": len(duplicates) + len(repeated),
        }
        report = {
            "counts": counts,
            "skipped": skipped,
            "duplicates": duplicates,
            "repeated_rows": repeated,
        }
        info = {
            **{k: shards[0].info[k] for k in ("fingerprint", "model", "source")},
            "shards": [str(Path(s).absolute()) for s in shard_roots],
            "shard": None,
            "embed_seconds": round(sum(s.info.get("embed_seconds", 0) for s in shards), 3),
            "skipped": len(skipped),
            "duplicates": len(duplicates),
        }
        w.publish(vectors, ids, info, report, index_type)
    return w.summary


# -- helpers -------------------------------------------------------------------------------------

# Roughly what one image's metadata row takes (paths, report, metadata and its JPEG thumbnail).
ROW_BYTES = 8 * 1024


def new_bytes(source: Source, embedder: Embedder) -> int:
    """About the disk space embedding a source takes: staged once, then written into a version
    (.npy vectors, flat FAISS indexes and a metadata row with a thumbnail, both times)."""
    vector = 4 * (embedder.dim + embedder.image_feature_dim)
    return len(source.items) * (3 * vector + 2 * ROW_BYTES)


def version_bytes(files: VersionFiles) -> int:
    """The size of a published version: what a copy of it (add, remove, reindex) takes."""
    return layout.tree_bytes(files.directory)


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
        "duplicates": len(metadata.duplicate_entries(conn)),
    }


def job_report(
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
        "duplicates": metadata.duplicate_entries(conn),
        "repeated_rows": repeated,
        **extra,
    }


def skips(job: JobResult, source: Source) -> list[Skip]:
    """What the job and the source left out, by the names the index uses, sorted."""
    named = [Skip(source.name_of(s.path), s.reason) for s in job.skipped]
    return sorted(named + source.missing, key=lambda s: s.path)


def refuse_empty(source: Source, job: JobResult) -> None:
    """An index of nothing would replace a useful one: say why nothing could be indexed."""
    if job.kept:
        return
    where = source.location
    if not source.items and source.kind not in ("images", "manifest"):
        reasons = sorted({s.reason for s in source.missing})[:3]
        raise IndexStoreError(
            f"no images found in {where}: {len(source.missing)} items that cannot be indexed "
            f"({'; '.join(reasons) or 'none listed'}); the current version is unchanged"
        )
    if not source.items:
        raise IndexStoreError(
            f"no images found in {where} (PNG, JPEG, DICOM; {len(source.missing)} manifest rows "
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
    check_factory_for(index_type, embedder.dim, "joint")
    check_factory_for(index_type, embedder.image_feature_dim, "encoder")


def check_factory_for(index_type: str, dim: int, space: str) -> None:
    if index_type not in faiss_index.NAMED_TYPES:
        faiss_index.check_factory(index_type, dim)


def open_staging(root: Path, embedder: Embedder) -> Staging:
    fingerprint = embedder.bundle.fingerprint
    dims = (embedder.image_feature_dim, embedder.dim)
    return Staging(layout.staging_dir(root, fingerprint), fingerprint, dims)


def image_row(item: ManifestItem, staged: StagedImage, source: Source) -> tuple:
    meta = {**staged.file_meta, **{k: v for k, v in item.meta.items() if v != ""}}
    return (
        metadata.content_id(staged.sha256),
        source.name_of(item.path),
        item.relpath,
        str(source.location),
        staged.sha256,
        staged.size_bytes,
        staged.width,
        staged.height,
        meta.get("modality") or None,
        meta.get("view") or None,
        item.text,
        json.dumps(meta, sort_keys=True),
        staged.thumbnail,
    )


def insert_new(
    conn,
    kept: list[tuple[ManifestItem, str]],
    staging: Staging | None,
    source: Source,
    current: VersionFiles | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Insert the metadata rows of newly embedded images; their ids and vectors, in that order.
    Without a staging area (nothing was embedded) the dimensions are those of `current`."""
    if staging is not None:
        encoder_dim, joint_dim = staging.dims
    else:
        encoder_dim, joint_dim = current.info["dims"]["encoder"], current.info["dims"]["joint"]
    ids = np.zeros(len(kept), np.int64)
    vectors = {
        "encoder": np.zeros((len(kept), encoder_dim), np.float32),
        "joint": np.zeros((len(kept), joint_dim), np.float32),
    }
    rows = []
    for row, (item, sha) in enumerate(kept):
        staged = staging.get(sha)
        ids[row] = metadata.content_id(sha)
        vectors["encoder"][row], vectors["joint"][row] = staged.encoder, staged.joint
        rows.append(image_row(item, staged, source))
        if len(rows) >= 1000:
            metadata.insert_rows(conn, rows)
            rows = []
    metadata.insert_rows(conn, rows)
    return ids, vectors


def duplicate_rows(
    job: JobResult, source: Source, already: Sequence[str] = ()
) -> list[tuple[str, int, str]]:
    """Duplicates table rows: every other path of a kept content (repeated rows excluded)."""
    name = source.name_of
    rows = [
        (name(d.item.path), metadata.content_id(d.sha256), name(d.first))
        for d in job.duplicates
        if name(d.item.path) != name(d.first)
    ]
    rows += [
        (name(item.path), metadata.content_id(sha), "")
        for item, sha in job.known
        if name(item.path) not in already
    ]
    return rows


def resolve_targets(
    conn, root: Path, ids: list[int], paths: list[str]
) -> tuple[list[int], list[str]]:
    """Ids to remove and duplicate paths to forget; an error naming anything not in the index."""
    known = set(metadata.sorted_ids(conn))
    doomed = {i for i in ids if i in known}
    missing = [f"id {i}" for i in ids if i not in known]
    aliases = []
    for text in paths:
        found = metadata.ids_for_path(conn, text) or metadata.ids_for_path(
            conn, os.path.abspath(text)
        )
        alias = [p for p in (text, os.path.abspath(text)) if metadata.is_duplicate_path(conn, p)]
        doomed.update(found)
        aliases += alias[:1]
        if not found and not alias:
            missing.append(f"path {text}")
    if missing:
        raise IndexStoreError(
            f"not in the current version of {root}: {', '.join(missing)} "
            "(`convirt index info` shows the version; ids and paths come from search results)"
        )
    return sorted(doomed), aliases


def check_shards(shards: list[VersionFiles], roots: Sequence[str | Path]) -> None:
    if not shards:
        raise IndexStoreError("merge needs at least one shard directory")
    for shard, root in zip(shards, roots, strict=True):
        if not shard.info.get("shard"):
            raise IndexStoreError(f"{root} is not a shard (it was not built with --shard I/N)")
    first = shards[0].info
    for shard, root in zip(shards[1:], roots[1:], strict=True):
        check_fingerprint(f"shard {root}", shard.fingerprint, first["fingerprint"])
        if shard.info["source"] != first["source"]:
            raise IndexStoreError(
                f"shard {root} was built from {shard.info['source']['location']}, shard "
                f"{roots[0]} from {first['source']['location']}: merge shards of one source"
            )
    count = first["shard"]["count"]
    seen = [s.info["shard"]["index"] for s in shards]
    if any(s.info["shard"]["count"] != count for s in shards) or sorted(seen) != list(range(count)):
        missing = sorted(set(range(count)) - set(seen))
        raise IndexStoreError(
            f"merge needs each of the {count} shards exactly once; got shard numbers "
            f"{sorted(seen)}{f', missing {missing}' if missing else ''}"
        )


def choose_primaries(
    shards: list[VersionFiles],
) -> tuple[dict[int, tuple[str, int]], list[tuple[str, int, str]]]:
    """Per content id, the copy a single build keeps (smallest relpath); others are duplicates."""
    chosen: dict[int, tuple[str, int, str]] = {}
    losers = []
    for position, shard in enumerate(shards):
        with closing(metadata.open_readonly(shard.meta_path)) as conn:
            for image_id, relpath, path in metadata.image_names(conn):
                claim = (relpath, position, path)
                best = chosen.get(image_id)
                if best is None or claim < best:
                    chosen[image_id] = claim
                    best, claim = claim, best
                if claim is not None:
                    losers.append((claim[2], image_id, ""))
    return {i: (c[0], c[1]) for i, c in chosen.items()}, losers


def copy_shards(
    conn, shards: list[VersionFiles], chosen: dict[int, tuple[str, int]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids_parts, vector_parts = [], {space: [] for space in SPACES}
    for position, shard in enumerate(shards):
        shard_ids = shard.ids()
        mine = np.array([chosen[int(i)][1] == position for i in shard_ids], dtype=bool)
        metadata.copy_from(conn, shard.meta_path, shard_ids[mine], None)
        ids_parts.append(shard_ids[mine])
        for space in SPACES:
            vector_parts[space].append(shard.vectors(space)[mine])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    return ids, {space: np.concatenate(parts) for space, parts in vector_parts.items()}
