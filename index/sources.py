"""What to index: a folder tree of images or a manifest of image paths with metadata and reports.

Items come out sorted by their path relative to the source, which fixes the processing order (and so
which copy of a duplicated image is kept) whatever the file system lists first.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from convirt.imageio import IMAGE_SUFFIXES, looks_like_dicom
from convirt.manifest import ManifestError, read_manifest_rows

from .errors import IndexStoreError


class SourceError(IndexStoreError):
    """A folder or manifest cannot be used as a source; the message says what to change."""


@dataclass
class SourceItem:
    """One image to index: where it is, how the source names it, and what the source says of it."""

    path: Path  # absolute
    relpath: str  # relative to the folder or the manifest's directory, '/'-separated
    report: str = ""
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Skip:
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Source:
    """The items of one source, plus rows that point at nothing (reported, never embedded)."""

    kind: str  # "images" or "manifest"
    location: Path
    items: list[SourceItem]
    missing: list[Skip] = field(default_factory=list)

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "location": str(self.location)}

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
                items.append(SourceItem(path, path.relative_to(folder).as_posix()))
    items.sort(key=lambda item: item.relpath)
    return Source("images", folder, items)


def single_file(path: str | Path) -> Source:
    path = Path(path).absolute()
    return Source("images", path.parent, [SourceItem(path, path.name)])


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
    rows = read_rows(manifest)
    if not rows:
        raise SourceError(f"{manifest} has no rows")
    if image_column not in rows[0]:
        raise SourceError(
            f"{manifest} has no column {image_column!r}; its columns are: "
            f"{', '.join(rows[0])} (choose the image column with --image-column)"
        )
    items, missing = [], []
    for row in rows:
        relpath = Path(row[image_column]).as_posix()
        path = Path(os.path.normpath(manifest.parent / relpath))
        if not relpath or not path.is_file():
            missing.append(Skip(str(path), "file not found (named by the manifest)"))
            continue
        meta = {k: v for k, v in row.items() if v and k not in (image_column, text_column)}
        items.append(SourceItem(path, relpath, (row.get(text_column) or "").strip(), meta))
    items.sort(key=lambda item: item.relpath)  # stable: repeated rows keep manifest order
    return Source("manifest", manifest, items, missing)


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV or JSONL file as dicts of strings (None -> '')."""
    try:
        return read_manifest_rows(path)
    except ManifestError as err:
        raise SourceError(str(err)) from err
