"""Merge: the shards of one sharded build (`convirt index build --shard I/N`) joined into one version
of a root, equal to a single build of the whole archive (same ids, paths, metadata, vectors)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from .. import faiss_index, layout, metadata
from ..errors import IndexStoreError, check_fingerprint
from ..version import SPACES, VersionFiles, read_version
from . import rows
from .template import Summary, version_bytes, writing


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
    for dim in shards[0].info["dims"].values():
        faiss_index.check_index_type(index_type, dim)
    chosen, losers = choose_primaries(shards)
    with writing(root, "merge", keep=keep, started=started) as w:
        w.reuse_from = [shard.directory for shard in shards]
        w.needs(lambda: sum(version_bytes(shard) for shard in shards))
        ids, vectors = copy_shards(w.meta, shards, chosen)
        rows.insert_duplicates(w.meta, losers)
        rows.settle_duplicates(w.meta)
        outcomes = [s.outcome() for s in shards]
        skipped = sorted(
            (s for r in outcomes for s in r.get("skipped", [])), key=lambda s: s["path"]
        )
        repeated = sorted(p for r in outcomes for p in r.get("repeated_rows", []))
        duplicates = rows.duplicate_entries(w.meta)
        counts = {
            "embedded": sum(r["counts"].get("embedded", 0) for r in outcomes),
            "resumed": sum(r["counts"].get("resumed", 0) for r in outcomes),
            "skipped": len(skipped),
            "duplicates": len(duplicates) + len(repeated),
        }
        outcome = {
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
        w.publish(vectors, ids, info, outcome, index_type)
    return w.summary


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
            for image_id, relpath, path in rows.image_names(conn):
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
        rows.copy_from(conn, shard.meta_path, shard_ids[mine], None)
        ids_parts.append(shard_ids[mine])
        for space in SPACES:
            vector_parts[space].append(shard.vectors(space)[mine])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    return ids, {space: np.concatenate(parts) for space, parts in vector_parts.items()}
