"""One index version: what a directory under ROOT/versions/ holds, and how it is read.

    version.json        fingerprint, counts, index type, dims, source, timings, parent version
    build_report.json   skipped files (with the reason), duplicates, what this operation changed
    ids.npy             int64 ids, sorted; row i of the vectors belongs to ids[i]
    joint.npy           float32 v/|v| (joint space: text queries)
    encoder.npy         float32 h/|h| (encoder space: image-to-image)
    joint.faiss         IndexIDMap2 over joint.npy (absent in a shard)
    encoder.faiss       IndexIDMap2 over encoder.npy (absent in a shard)
    {space}.f16.npy     float16 vectors of a compressed index (index/compressed.py), read by its
                        re-ranking: such a version keeps no float32 {space}.npy (half the disk)
    meta.sqlite         one row per id: path, hash, size, metadata, report; the facets and
                        per-field tables written at publish (index/write/lookups.py)
    thumbs.sqlite       one JPEG thumbnail per id (versions written before issue 25 keep
                        them in meta.sqlite)
    sentences.npy       float32 u/|u| of the reports' sentences (index.write.sentences)

A format-2 version (written by add, sync, remove and compact: index/write/segments.py) holds only

    version.json        "format": 2, "segments": ["versions/000001", "segments/000002"] (paths
                        relative to ROOT, in order), "deleted": len(deleted.npy), "count" (live
                        images), and the keys above; "factory" is the largest segment's
    deleted.npy         int64, sorted: ids its segments hold that it no longer serves

and serves the live rows of its segments, each a directory holding the files above (a format-1
version's own, or one under ROOT/segments/), written once and never changed. A live id is in
exactly one segment; every segment has the version's fingerprint and dims; each chose its index
type from its own size. A format-1 version is read as a one-segment version with nothing
deleted; `segments()` reads them, index/read/segmented.py serves them as one version.

The .npy files (float32, or a compressed version's float16) are the source of truth:
add/remove/merge copy them instead of re-embedding, and
the FAISS files can be rebuilt from them with another --index-type (`convirt index reindex`).
version.json records the SHA-256 of each of these data files (meta.sqlite and thumbs.sqlite
aside: SQLite's own checks cover those, at publish and in `verify`): a server checks the FAISS
files and ids.npy against them at every start and reload, `convirt index verify` all of them.

How a version is written (the one template of every write) is index/write/template.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from convirt.hashing import sha256_file

from . import compressed, faiss_index
from .errors import IndexStoreError, reason
from .metadata import META_DB

INFO_FORMAT = 1
# a version that lists segments (each a format-1 directory) and the ids it no longer serves
SEGMENTED_FORMAT = 2
READ_FORMATS = (INFO_FORMAT, SEGMENTED_FORMAT)
DELETED_NAME = "deleted.npy"
INFO_NAME = "version.json"
OUTCOME_NAME = "build_report.json"  # the outcome of the write that made the version
SPACES = ("joint", "encoder")
# the report sentences' vectors (index.read.sentences, index.write.sentences)
SENTENCE_VECTORS = "sentences.npy"


@dataclass
class VersionFiles:
    """A published version directory, read lazily."""

    directory: Path
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.info.get("version") or self.directory.name

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def meta_path(self) -> Path:
        return self.directory / META_DB

    def ids(self) -> np.ndarray:
        return np.load(self.directory / "ids.npy")

    def vectors(self, space: str, mmap: bool = False) -> np.ndarray:
        """The space's vectors: float32 {space}.npy, or a compressed version's float16 copy
        (its only one); callers that compute cast to float32."""
        path = self.directory / f"{space}.npy"
        if not path.is_file() and compressed.float16_path(self.directory, space).is_file():
            path = compressed.float16_path(self.directory, space)
        return np.load(path, mmap_mode="r" if mmap else None)

    def faiss_index(self, space: str) -> faiss.Index | faiss_index.CompressedIndex:
        path = self.directory / f"{space}.faiss"
        if not path.is_file():
            raise IndexStoreError(f"{path} is missing: rebuild with `convirt index reindex`")
        return faiss_index.read_index(self.directory, space)

    def checksum_problem(self, name: str) -> str | None:
        """Why the file `name` is not what was published (its SHA-256 differs from the one
        version.json recorded), or None; versions written before checksums were recorded pass."""
        recorded = (self.info.get("checksums") or {}).get(name)
        if recorded is None:
            return None
        if sha256_file(self.directory / name) != recorded:
            return (
                f"{name} is not the file published with this version (its SHA-256 differs from "
                "version.json's): it was changed or damaged since; rebuild it with "
                "`convirt index reindex` or restore it from a backup"
            )
        return None

    @property
    def is_segmented(self) -> bool:
        """Whether this version lists segments (format 2) instead of holding the data itself."""
        return self.info.get("format") == SEGMENTED_FORMAT

    @property
    def root(self) -> Path:
        """The index root: a version directory is ROOT/versions/NAME."""
        return self.directory.parent.parent

    @property
    def segment_dirs(self) -> list[Path]:
        """The directories holding this version's data, in order; a format-1 version is its own."""
        if not self.is_segmented:
            return [self.directory]
        return [self.root / str(path) for path in self.info.get("segments") or []]

    def segments(self) -> list[VersionFiles]:
        """Each segment read with read_version (IndexStoreError naming a missing or unreadable
        one); a format-1 version is its own one segment."""
        if not self.is_segmented:
            return [self]
        found = []
        for directory in self.segment_dirs:
            segment = read_version(directory)
            if segment.is_segmented:
                raise IndexStoreError(
                    f"{directory} is listed as a segment of {self.directory} but is itself a "
                    "list of segments: the version is damaged"
                )
            found.append(segment)
        return found

    def deleted(self) -> np.ndarray:
        """The ids the segments hold that this version does not serve (int64, sorted, unique);
        empty for a format-1 version."""
        if not self.is_segmented:
            return np.zeros(0, dtype=np.int64)
        return np.load(self.directory / DELETED_NAME).astype(np.int64, copy=False)

    def outcome(self) -> dict[str, Any]:
        path = self.directory / OUTCOME_NAME
        return json.loads(path.read_text()) if path.is_file() else {}


DATA_FILES = (
    "ids.npy",
    "joint.npy",
    "encoder.npy",
    "joint.faiss",
    "encoder.faiss",
    "joint.f16.npy",  # a compressed index's float16 vectors (index/compressed.py)
    "encoder.f16.npy",
    SENTENCE_VECTORS,
    DELETED_NAME,  # a format-2 version's only data file
)


def checksums(directory: Path) -> dict[str, str]:
    """The SHA-256 of each data file a version directory holds."""
    return {
        name: sha256_file(directory / name) for name in DATA_FILES if (directory / name).is_file()
    }


def read_version(directory: Path) -> VersionFiles:
    path = Path(directory) / INFO_NAME
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise IndexStoreError(f"{path} is missing: {directory} is not a complete version") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise IndexStoreError(
            f"{path} cannot be read ({err}): {directory} is damaged; point CURRENT at another "
            "version or rebuild"
        ) from None
    if not isinstance(info, dict):
        raise IndexStoreError(f"{path} is not a version description: {directory} is damaged")
    if info.get("format") not in READ_FORMATS:
        raise IndexStoreError(
            f"{directory}: index format {info.get('format')!r}, this version reads "
            f"{' and '.join(map(str, READ_FORMATS))}; rebuild the index with this version of convirt"
        )
    return VersionFiles(Path(directory), info)


def load_array(load: Callable[[], np.ndarray], name: str, problems: list[str]) -> np.ndarray | None:
    """An .npy file, or None with the reason appended to problems (truncated, garbled, missing)."""
    try:
        return load()
    except Exception as err:
        problems.append(f"{name} cannot be read: {reason(err)}")
        return None
