"""A source: the items to index (files, each with its relative path, report and metadata), the
rows that point at nothing, and the hooks a remote source fills in (fetch, names, source info)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convirt.manifest import ManifestItem, Skip

from ..errors import IndexStoreError


class SourceError(IndexStoreError):
    """A folder or manifest cannot be used as a source; the message says what to change."""


@dataclass
class Source:
    """The items of one source, plus rows that point at nothing (reported, never embedded)."""

    kind: str  # "images", "manifest" or a remote kind ("dicomweb")
    location: Path | str  # a folder, a manifest file or a remote source's URL
    items: list[ManifestItem]
    skipped: list[Skip] = field(default_factory=list)  # rows that cannot be indexed, and why
    names: dict[str, str] = field(default_factory=dict)  # local copy -> name stored (remote)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": str(self.location)}

    def name_of(self, path: Path | str) -> str:
        """The path the index stores for an item's file: the file's own, unless remote."""
        return self.names.get(str(path), str(path))

    def fetch(self, directory: Path, progress: bool = True) -> Source:
        """This source with every item in a local file. A remote source downloads into
        `directory` (the write's staging area: kept until the version is published, so a rerun
        does not download again); a folder or a manifest is local already."""
        return self

    def source_info(self, inherited: dict[str, Any]) -> dict[str, Any]:
        """Keys a remote source adds to version.json (its sync cursor), given the info the new
        version inherits ({} for a build)."""
        return {}

    def changes_rows(self, meta: Path) -> bool:
        """Whether `finish` would change rows of the earlier segment whose meta.sqlite is `meta`
        (a segment is immutable: the write then rewrites its rows into the new one)."""
        return False

    def finish(self, conn, skipped: list[Skip]) -> dict[str, Any]:
        """Called with the new version's metadata (sqlite3) before it is published, and what was
        skipped; returns keys for build_report.json ("counts" are merged into its counts)."""
        return {}

    def shard(self, index: int, count: int) -> Source:
        """The items whose relative path hashes to shard `index` of `count` (deterministic)."""
        mine = [item for item in self.items if shard_of(item.relpath, count) == index]
        skipped = [s for s in self.skipped if shard_of(s.path, count) == index]
        return Source(self.kind, self.location, mine, skipped)


def shard_of(relpath: str, count: int) -> int:
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n) as (i, n), with a clear error for anything else."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SourceError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of 4") from None
    if count < 1 or not 0 <= index < count:
        raise SourceError(f"--shard {text!r}: need 0 <= I < N (shards are numbered from 0)")
    return index, count
