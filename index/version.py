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
        return self.info["version"]

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
    if info.get("format") != INFO_FORMAT:
        raise IndexStoreError(
            f"{directory}: index format {info.get('format')!r}, this version reads "
            f"{INFO_FORMAT}; rebuild the index with this version of convirt"
        )
    return VersionFiles(Path(directory), info)


def load_array(load: Callable[[], np.ndarray], name: str, problems: list[str]) -> np.ndarray | None:
    """An .npy file, or None with the reason appended to problems (truncated, garbled, missing)."""
    try:
        return load()
    except Exception as err:
        problems.append(f"{name} cannot be read: {reason(err)}")
        return None
