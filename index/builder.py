"""Write operations on an index root: build, add, remove, reindex, merge. Each writes a new version.

Every operation holds ROOT/.lock, assembles the new version in a tmp directory and switches CURRENT
only once it is complete. Embedding goes through the staging area (by content hash), so a killed
build or add, run again, embeds only what it had not committed yet.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
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
from .version import SPACES, VersionFiles, VersionWriter, read_version

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


@dataclass
class Summary:
    """What an operation did; `line()` is the one-line account the CLI prints."""

    operation: str
    version: str
    directory: Path
    count: int
    changes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        done = ", ".join(f"{n} {what}" for what, n in self.changes.items() if n)
        return (
            f"{self.operation}: version {self.version} with {self.count} images"
            f"{f' ({done})' if done else ''} in {self.seconds:.1f}s; "
            f"report: {self.directory / 'build_report.json'}"
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
    options, root, started = options or Options(), Path(root), time.perf_counter()
    index_type = None if shard else options.index_type
    with layout.write_lock(root):
        layout.remove_tmp_dirs(root)
        bundle = load_model(model, options.device)
        embedder = Embedder(bundle, options.device, options.batch_size)
        check_index_type(index_type, embedder)
        if shard is not None:
            source = source.shard(*shard)
        with (
            layout.disk_full_as_error(root, "build", lambda: new_bytes(source, embedder)),
            closing(open_staging(root, embedder)) as staging,
        ):
            job = run_job(source.items, embedder, staging, options.job_settings())
            if shard is None:
                refuse_empty(source, job)
            with VersionWriter(root, started) as writer:
                ids, vectors = insert_new(writer.meta, job.kept, staging, source)
                metadata.insert_duplicates(writer.meta, duplicate_rows(job))
                skipped = sorted(job.skipped + source.missing, key=lambda s: s.path)
                report = job_report("build", job, skipped, writer.meta)
                info = {
                    **model_info(bundle),
                    "operation": "build",
                    "parent": layout.read_current(root),
                    "source": source.describe(),
                    "shard": {"index": shard[0], "count": shard[1]} if shard else None,
                    **job_info(job, skipped, writer.meta),
                }
                directory = writer.publish(vectors, ids, info, report, index_type)
            staging.remove()
            layout.prune_versions(root, options.keep)
    return summarise("build", directory, report["counts"], started)


def add(
    root: str | Path, model: ModelLike, source: Source, options: Options | None = None
) -> Summary:
    """Embed the new images of `source` and copy every old vector into a new version."""
    options, root, started = options or Options(), Path(root), time.perf_counter()
    with layout.write_lock(root):
        layout.remove_tmp_dirs(root)
        current = open_writable_current(root)
        bundle = load_model(model, options.device)
        check_fingerprint(
            f"index {root} (version {current.name})", current.fingerprint, bundle.fingerprint
        )
        embedder = Embedder(bundle, options.device, options.batch_size)
        with (
            layout.disk_full_as_error(
                root, "add", lambda: version_bytes(current) + new_bytes(source, embedder)
            ),
            closing(open_staging(root, embedder)) as staging,
        ):
            with closing(metadata.open_readonly(current.meta_path)) as conn:
                indexed = metadata.hashes_and_paths(conn)
            job = run_job(
                source.items, embedder, staging, options.job_settings(), frozenset(indexed)
            )
            by_path = {path: image_id for image_id, path in indexed.values()}
            replaced = sorted(
                {by_path[str(item.path)] for item, _ in job.kept if str(item.path) in by_path}
            )
            already = [
                str(item.path) for item, sha in job.known if indexed[sha][1] == str(item.path)
            ]
            old_ids = current.ids()
            keep = ~np.isin(old_ids, replaced)
            with VersionWriter(root, started) as writer:
                metadata.copy_from(writer.meta, current.meta_path, old_ids[keep], old_ids[keep])
                new_ids, new_vectors = insert_new(writer.meta, job.kept, staging, source)
                metadata.insert_duplicates(writer.meta, duplicate_rows(job, already))
                ids = np.concatenate([old_ids[keep], new_ids])
                vectors = {
                    space: np.concatenate([current.vectors(space)[keep], new_vectors[space]])
                    for space in SPACES
                }
                skipped = sorted(job.skipped + source.missing, key=lambda s: s.path)
                report = job_report("add", job, skipped, writer.meta)
                report["counts"].update(replaced=len(replaced), already_indexed=len(already))
                report.update(
                    added=[str(item.path) for item, _ in job.kept], already_indexed=already
                )
                info = {
                    **current.info,
                    "operation": "add",
                    "parent": current.name,
                    "added_from": source.describe(),
                    **job_info(job, skipped, writer.meta),
                }
                directory = writer.publish(vectors, ids, info, report, current.info["index_type"])
            staging.remove()
            layout.prune_versions(root, options.keep)
    return summarise("add", directory, report["counts"], started)


def remove(
    root: str | Path,
    ids: Iterable[int] = (),
    paths: Iterable[str] = (),
    keep: int = layout.KEEP_VERSIONS,
) -> Summary:
    """A new version without the given images (by id, or by path: absolute or as indexed)."""
    root, started = Path(root), time.perf_counter()
    with layout.write_lock(root):
        layout.remove_tmp_dirs(root)
        current = open_writable_current(root)
        with closing(metadata.open_readonly(current.meta_path)) as conn:
            doomed, aliases = resolve_targets(conn, root, list(ids), list(paths))
        with layout.disk_full_as_error(root, "remove", lambda: version_bytes(current)):
            directory, count = rewrite(root, current, "remove", doomed, aliases, None, started)
            layout.prune_versions(root, keep)
    changes = {"removed": len(doomed), "duplicate paths removed": len(aliases)}
    return Summary(
        "remove", directory.name, directory, count, changes, time.perf_counter() - started
    )


def reindex(root: str | Path, index_type: str, keep: int = layout.KEEP_VERSIONS) -> Summary:
    """The same vectors and metadata under another FAISS structure; nothing is re-embedded."""
    root, started = Path(root), time.perf_counter()
    with layout.write_lock(root):
        layout.remove_tmp_dirs(root)
        current = open_writable_current(root)
        for space, dim in current.info["dims"].items():
            check_factory_for(index_type, dim, space)
        with layout.disk_full_as_error(root, "reindex", lambda: version_bytes(current)):
            directory, count = rewrite(root, current, "reindex", [], [], index_type, started)
            layout.prune_versions(root, keep)
    return Summary("reindex", directory.name, directory, count, {}, time.perf_counter() - started)


def rewrite(
    root: Path,
    current: VersionFiles,
    operation: str,
    doomed: Sequence[int],
    aliases: Sequence[str],
    index_type: str | None,
    started: float,
) -> tuple[Path, int]:
    old_ids = current.ids()
    keep = ~np.isin(old_ids, np.asarray(doomed, dtype=np.int64))
    with VersionWriter(root, started) as writer:
        metadata.copy_from(writer.meta, current.meta_path, old_ids[keep], old_ids[keep])
        writer.meta.executemany("DELETE FROM duplicates WHERE path = ?", [(a,) for a in aliases])
        vectors = {space: current.vectors(space)[keep] for space in SPACES}
        report = {
            "operation": operation,
            "counts": {"removed": len(doomed), "duplicate_paths_removed": len(aliases)},
            "removed_ids": [int(i) for i in doomed],
            "removed_duplicate_paths": list(aliases),
        }
        info = {**current.info, "operation": operation, "parent": current.name}
        directory = writer.publish(
            vectors, old_ids[keep], info, report, index_type or current.info["index_type"]
        )
    return directory, int(keep.sum())


def merge(
    root: str | Path,
    shard_roots: Sequence[str | Path],
    index_type: str = "auto",
    keep: int = layout.KEEP_VERSIONS,
) -> Summary:
    """Join the shards of one sharded build into a version of `root`, equal to a single build."""
    root, started = Path(root), time.perf_counter()
    shards = [read_version(layout.current_version_dir(Path(s))) for s in shard_roots]
    check_shards(shards, shard_roots)
    for space, dim in shards[0].info["dims"].items():
        check_factory_for(index_type, dim, space)
    chosen, losers = choose_primaries(shards)
    with layout.write_lock(root):
        layout.remove_tmp_dirs(root)
        needed = lambda: sum(version_bytes(shard) for shard in shards)  # noqa: E731 (asked on failure)
        with layout.disk_full_as_error(root, "merge", needed):
            with VersionWriter(root, started) as writer:
                ids, vectors = copy_shards(writer, shards, chosen)
                metadata.insert_duplicates(writer.meta, losers)
                settle_duplicates(writer.meta)
                reports = [s.report() for s in shards]
                skipped = sorted(
                    (s for r in reports for s in r.get("skipped", [])), key=lambda s: s["path"]
                )
                repeated = sorted(p for r in reports for p in r.get("repeated_rows", []))
                duplicates = table_duplicates(writer.meta)
                counts = {
                    "embedded": sum(r["counts"].get("embedded", 0) for r in reports),
                    "resumed": sum(r["counts"].get("resumed", 0) for r in reports),
                    "skipped": len(skipped),
                    "duplicates": len(duplicates) + len(repeated),
                }
                report = {
                    "operation": "merge",
                    "counts": counts,
                    "skipped": skipped,
                    "duplicates": duplicates,
                    "repeated_rows": repeated,
                }
                info = {
                    **{k: shards[0].info[k] for k in ("fingerprint", "model", "source")},
                    "operation": "merge",
                    "shards": [str(Path(s).absolute()) for s in shard_roots],
                    "shard": None,
                    "parent": layout.read_current(root),
                    "embed_seconds": round(sum(s.info.get("embed_seconds", 0) for s in shards), 3),
                    "skipped": len(skipped),
                    "duplicates": len(duplicates),
                }
                directory = writer.publish(vectors, ids, info, report, index_type)
            layout.prune_versions(root, keep)
    return summarise("merge", directory, counts, started)


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
        "duplicates": len(table_duplicates(conn)),
    }


def job_report(operation: str, job: JobResult, skipped: list[Skip], conn) -> dict[str, Any]:
    repeated = sorted(str(d.item.path) for d in job.duplicates if str(d.item.path) == d.first)
    duplicates = table_duplicates(conn)
    return {
        "operation": operation,
        "counts": {
            "embedded": job.embedded,
            "resumed": job.resumed,
            "skipped": len(skipped),
            "duplicates": len(job.duplicates),
        },
        "skipped": [s.as_dict() for s in skipped],
        "duplicates": duplicates,
        "repeated_rows": repeated,
    }


def refuse_empty(source: Source, job: JobResult) -> None:
    """An index of nothing would replace a useful one: say why nothing could be indexed."""
    if job.kept:
        return
    where = source.location
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


def summarise(operation: str, directory: Path, counts: dict[str, int], started: float) -> Summary:
    info = read_version(directory).info
    return Summary(
        operation,
        info["version"],
        directory,
        info["count"],
        dict(counts),
        time.perf_counter() - started,
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


def open_writable_current(root: Path) -> VersionFiles:
    current = read_version(layout.current_version_dir(root))
    if current.info.get("shard"):
        shard = current.info["shard"]
        raise IndexStoreError(
            f"{root} holds shard {shard['index']}/{shard['count']} of a sharded build: "
            "merge the shards into an index first (`convirt index merge --out ROOT SHARD...`)"
        )
    return current


def image_row(item: ManifestItem, staged: StagedImage, source: Source) -> tuple:
    meta = {**staged.file_meta, **{k: v for k, v in item.meta.items() if v != ""}}
    return (
        metadata.content_id(staged.sha256),
        str(item.path),
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
    conn, kept: list[tuple[ManifestItem, str]], staging: Staging, source: Source
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Insert the metadata rows of newly embedded images; their ids and vectors, in that order."""
    encoder_dim, joint_dim = staging.dims
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


def duplicate_rows(job: JobResult, already: Sequence[str] = ()) -> list[tuple[str, int, str]]:
    """Duplicates table rows: every other path of a kept content (repeated rows excluded)."""
    rows = [
        (str(d.item.path), metadata.content_id(d.sha256), d.first)
        for d in job.duplicates
        if str(d.item.path) != d.first
    ]
    rows += [
        (str(item.path), metadata.content_id(sha), "")
        for item, sha in job.known
        if str(item.path) not in already
    ]
    return rows


def settle_duplicates(conn) -> None:
    """Point every duplicate at the path kept for its content."""
    conn.execute(
        "UPDATE duplicates SET duplicate_of = "
        "(SELECT path FROM images WHERE images.id = duplicates.id)"
    )
    conn.execute("DELETE FROM duplicates WHERE path = duplicate_of OR duplicate_of IS NULL")
    conn.execute(
        "DELETE FROM duplicates "
        "WHERE rowid NOT IN (SELECT min(rowid) FROM duplicates GROUP BY path)"
    )
    conn.commit()


def table_duplicates(conn) -> list[dict[str, Any]]:
    settle_duplicates(conn)
    rows = conn.execute("SELECT path, id, duplicate_of FROM duplicates ORDER BY path")
    return [{"path": p, "id": i, "duplicate_of": d} for p, i, d in rows]


def resolve_targets(
    conn, root: Path, ids: list[int], paths: list[str]
) -> tuple[list[int], list[str]]:
    """Ids to remove and duplicate paths to forget; an error naming anything not in the index."""
    known = {row[0] for row in conn.execute("SELECT id FROM images")}
    doomed = {i for i in ids if i in known}
    missing = [f"id {i}" for i in ids if i not in known]
    aliases = []
    for text in paths:
        found = metadata.ids_for_path(conn, text) or metadata.ids_for_path(
            conn, os.path.abspath(text)
        )
        alias = [p for p in (text, os.path.abspath(text)) if _is_duplicate_path(conn, p)]
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


def _is_duplicate_path(conn, path: str) -> bool:
    return conn.execute("SELECT 1 FROM duplicates WHERE path = ?", (path,)).fetchone() is not None


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
            for image_id, relpath, path in conn.execute("SELECT id, relpath, path FROM images"):
                claim = (relpath, position, path)
                best = chosen.get(image_id)
                if best is None or claim < best:
                    chosen[image_id] = claim
                    best, claim = claim, best
                if claim is not None:
                    losers.append((claim[2], image_id, ""))
    return {i: (c[0], c[1]) for i, c in chosen.items()}, losers


def copy_shards(
    writer: VersionWriter, shards: list[VersionFiles], chosen: dict[int, tuple[str, int]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids_parts, vector_parts = [], {space: [] for space in SPACES}
    for position, shard in enumerate(shards):
        shard_ids = shard.ids()
        mine = np.array([chosen[int(i)][1] == position for i in shard_ids], dtype=bool)
        metadata.copy_from(writer.meta, shard.meta_path, shard_ids[mine], None)
        ids_parts.append(shard_ids[mine])
        for space in SPACES:
            vector_parts[space].append(shard.vectors(space)[mine])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    return ids, {space: np.concatenate(parts) for space, parts in vector_parts.items()}
