"""Writes that embed nothing: remove images (by id or path) and reindex (the same vectors under
another FAISS structure). remove lists the ids in a new version's deleted.npy (write/segments.py);
reindex joins every segment's live rows into one format-1 version, migrates the metadata of DICOM
images an older version stored under former names (study_uid, modality, ...) to the naming
table's (convirt.imagerecord), and, as every publish, derives the normalised modality and body
part (index.fields) of a version built before them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .. import faiss_index, layout
from ..errors import IndexStoreError
from . import compact, rows, segments
from .template import Summary, Write, version_bytes, writing

# about what a version that only lists segments takes (version.json, deleted.npy, its report)
LISTING_BYTES = 64 * 1024


def remove(
    root: str | Path,
    ids: Iterable[int] = (),
    paths: Iterable[str] = (),
    keep: int = layout.KEEP_VERSIONS,
) -> Summary:
    """A new version without the given images (by id, or by path: absolute or as indexed): their
    ids go to deleted.npy, nothing is copied; a segment holding a duplicate path to forget is
    rewritten (write/segments.py)."""
    with writing(root, "remove", from_current=True, keep=keep) as w:
        listing = segments.Listing.of(w.current)
        doomed, aliases = resolve_targets(listing, w.root, list(ids), list(paths))
        changes = {"removed": len(doomed), "duplicate paths removed": len(aliases)}
        touched = listing.with_paths("duplicates", aliases)
        w.needs(lambda: LISTING_BYTES + sum(version_bytes(listing.files[i]) for i in touched))
        w.reuse_from = [f.directory for f in listing.files]
        outcome = {
            "counts": {"removed": len(doomed), "duplicate_paths_removed": len(aliases)},
            "removed_ids": [int(i) for i in doomed],
            "removed_duplicate_paths": list(aliases),
        }
        info = segments.segment_info(w.current)
        segment = None
        if touched:
            kept_ids, vectors = segments.gather(w, listing, touched, doomed)
            rows.forget_duplicate_paths(w.meta, aliases)
            kind = segments.segment_index_type(w.current.info.get("index_type"), len(kept_ids))
            segment = w.publish(vectors, kept_ids, info, outcome, kind, changes, as_segment=True)
        segments.publish_listing(w, listing, touched, segment, doomed, info, outcome, changes)
    w.summary.compaction = compact.by_policy(root, keep)
    return w.summary


def reindex(
    root: str | Path,
    index_type: str | None = None,
    keep: int = layout.KEEP_VERSIONS,
    ram_budget: int | None = None,
) -> Summary:
    """The same vectors and metadata under another FAISS structure (None: the current one), as
    one format-1 version (the segments of a format-2 one joined, deleted rows dropped); nothing
    is re-embedded. DICOM header fields stored under former names are renamed
    (rows.rename_former_names), and the normalised fields derived again, as every publish
    does (index.fields)."""
    with writing(root, "reindex", from_current=True, keep=keep) as w:
        for dim in w.current.info["dims"].values():
            if index_type is not None:
                faiss_index.check_index_type(index_type, dim)
        rewrite(w, index_type, rename_former=True, ram_budget=ram_budget)
    return w.summary


def rewrite(
    w: Write,
    index_type: str | None,
    rename_former: bool = False,
    ram_budget: int | None = None,
) -> None:
    """Publish every live row of w.current as one format-1 version (and, if `rename_former`,
    with its DICOM metadata under the naming table's names)."""
    current = w.current
    listing = segments.Listing.of(current)
    w.needs(lambda: sum(version_bytes(f) for f in listing.files))
    w.reuse_from = [f.directory for f in listing.files]
    ids, vectors = segments.gather(w, listing, range(len(listing.files)))
    changes: dict[str, int] = {}
    renamed = rows.rename_former_names(w.meta) if rename_former else 0
    if renamed:
        changes["metadata renamed"] = renamed
    outcome = {"counts": {}}
    index_type = index_type or current.info["index_type"]
    info = segments.segment_info(current)
    if ram_budget is not None:  # else the current version's, if any
        info["ram_budget"] = ram_budget
    w.publish(vectors, ids, info, outcome, index_type, changes)


def resolve_targets(
    listing: segments.Listing, root: Path, ids: list[int], paths: list[str]
) -> tuple[list[int], list[str]]:
    """Ids to remove and duplicate paths to forget; an error naming anything not in the index."""
    known = set(listing.live_ids().tolist())
    doomed = {i for i in ids if i in known}
    missing = [f"id {i}" for i in ids if i not in known]
    aliases = []
    for text in paths:
        found = listing.ids_for_path(text) or listing.ids_for_path(os.path.abspath(text))
        alias = [p for p in (text, os.path.abspath(text)) if listing.is_duplicate_path(p, known)]
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
