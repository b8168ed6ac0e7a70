"""What to index: a folder tree of images or a manifest of image paths with metadata and reports.

Items come out sorted by their path relative to the source, which fixes the processing order (and so
which copy of a duplicated image is kept) whatever the file system lists first.

A remote source (a PACS over DICOMweb: index/dicomweb.py) is a Source too: `fetch` downloads its
items into the write's staging area, and `name_of` gives the name each is stored under (its URL)
in place of the local copy's path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convirt.imageio import IMAGE_SUFFIXES, looks_like_dicom
from convirt.manifest import ManifestError, ManifestItem, Skip
from convirt.manifest import read_manifest as read_manifest_items

from .errors import IndexStoreError

REMOTE_SCHEME = "dicomweb://"  # the path of an image a PACS holds (index.dicomweb), not a file


def is_remote(path: str) -> bool:
    """Whether an indexed path names an image on a PACS rather than a file."""
    return path.startswith(REMOTE_SCHEME)


class SourceError(IndexStoreError):
    """A folder or manifest cannot be used as a source; the message says what to change."""


@dataclass
class Source:
    """The items of one source, plus rows that point at nothing (reported, never embedded)."""

    kind: str  # "images", "manifest" or a remote kind ("dicomweb")
    location: Path | str  # a folder, a manifest file or a remote source's URL
    items: list[ManifestItem]
    missing: list[Skip] = field(default_factory=list)
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

    def version_info(self, inherited: dict[str, Any]) -> dict[str, Any]:
        """Keys a remote source adds to version.json (its sync cursor), given the info the new
        version inherits ({} for a build)."""
        return {}

    def finish(self, conn, skipped: list[Skip]) -> dict[str, Any]:
        """Called with the new version's metadata (sqlite3) before it is published, and what was
        skipped; returns keys for build_report.json ("counts" are merged into its counts)."""
        return {}

    def shard(self, index: int, count: int) -> Source:
        """The items whose relative path hashes to shard `index` of `count` (deterministic)."""
        mine = [item for item in self.items if shard_of(item.relpath, count) == index]
        missing = [s for s in self.missing if shard_of(s.path, count) == index]
        return Source(self.kind, self.location, mine, missing)


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


def scan_folder(folder: str | Path) -> Source:
    """Every image under `folder` at any depth: known suffixes, and suffix-less DICOM files."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise SourceError(f"--images {folder}: not a directory")
    items = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            path = Path(directory) / name
            if not name.startswith(".") and _is_candidate(path):
                items.append(ManifestItem(path, path.relative_to(folder).as_posix()))
    items.sort(key=lambda item: item.relpath)
    return Source("images", folder, items)


def single_file(path: str | Path) -> Source:
    path = Path(path).absolute()
    return Source("images", path.parent, [ManifestItem(path, path.name)])


def _is_candidate(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix:
        return False
    try:
        with open(path, "rb") as f:
            return looks_like_dicom(f.read(132))
    except OSError:
        return False


def read_manifest(
    manifest: str | Path, image_column: str = "image", text_column: str = "text"
) -> Source:
    """Rows of a CSV or JSONL manifest; image paths are relative to the manifest's directory."""
    manifest = Path(manifest).absolute()
    try:
        items, missing = read_manifest_items(
            manifest, image_column=image_column, text_column=text_column
        )
    except ManifestError as err:
        raise SourceError(str(err)) from err
    items.sort(key=lambda item: item.relpath)  # stable: repeated rows keep manifest order
    return Source("manifest", manifest, items, missing)
