"""Writes that embed nothing: remove images (by id or path) and reindex (the same vectors under
another FAISS structure). Both copy the current version without what they drop; reindex also
migrates the metadata of DICOM images an older version stored under former names (study_uid,
modality, ...) to the naming table's (convirt.imagerecord), and, as every publish, derives the
normalised modality and body part (index.fields) of a version built before them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from .. import faiss_index, layout, metadata
from ..errors import IndexStoreError
from ..version import SPACES
from . import rows
from .template import Summary, Write, version_bytes, writing


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


def reindex(
    root: str | Path,
    index_type: str | None = None,
    keep: int = layout.KEEP_VERSIONS,
    ram_budget: int | None = None,
) -> Summary:
    """The same vectors and metadata under another FAISS structure (None: the current one);
    nothing is re-embedded. DICOM header fields stored under former names are renamed
    (rows.rename_former_names), and the normalised fields derived again, as every publish
    does (index.fields)."""
    with writing(root, "reindex", from_current=True, keep=keep) as w:
        for dim in w.current.info["dims"].values():
            if index_type is not None:
                faiss_index.check_index_type(index_type, dim)
        rewrite(w, [], [], index_type, {}, rename_former=True, ram_budget=ram_budget)
    return w.summary


def rewrite(
    w: Write,
    doomed: Sequence[int],
    aliases: Sequence[str],
    index_type: str | None,
    changes: dict[str, int],
    rename_former: bool = False,
    ram_budget: int | None = None,
) -> None:
    """Publish w.current without the ids `doomed` and the duplicate paths `aliases` (and, if
    `rename_former`, with its DICOM metadata under the naming table's names)."""
    current = w.current
    w.needs(lambda: version_bytes(current))
    old_ids = current.ids()
    keep = ~np.isin(old_ids, np.asarray(doomed, dtype=np.int64))
    rows.copy_from(w.meta, current.meta_path, old_ids[keep], old_ids[keep])
    rows.forget_duplicate_paths(w.meta, aliases)
    renamed = rows.rename_former_names(w.meta) if rename_former else 0
    if renamed:
        changes = {**changes, "metadata renamed": renamed}
    vectors = {space: current.vectors(space)[keep] for space in SPACES}
    outcome = {
        "counts": {"removed": len(doomed), "duplicate_paths_removed": len(aliases)},
        "removed_ids": [int(i) for i in doomed],
        "removed_duplicate_paths": list(aliases),
    }
    index_type = index_type or current.info["index_type"]
    info = dict(current.info)
    if ram_budget is not None:  # else the current version's, if any
        info["ram_budget"] = ram_budget
    w.publish(vectors, old_ids[keep], info, outcome, index_type, changes)


def resolve_targets(
    conn, root: Path, ids: list[int], paths: list[str]
) -> tuple[list[int], list[str]]:
    """Ids to remove and duplicate paths to forget; an error naming anything not in the index."""
    known = set(rows.sorted_ids(conn))
    doomed = {i for i in ids if i in known}
    missing = [f"id {i}" for i in ids if i not in known]
    aliases = []
    for text in paths:
        found = rows.ids_for_path(conn, text) or rows.ids_for_path(conn, os.path.abspath(text))
        alias = [p for p in (text, os.path.abspath(text)) if rows.is_duplicate_path(conn, p)]
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
