"""One index version: what a directory under ROOT/versions/ holds, how it is written and read.

    version.json        fingerprint, counts, index type, dims, source, timings, parent version
    build_report.json   skipped files (with the reason), duplicates, what this operation changed
    ids.npy             int64 ids, sorted; row i of the vectors belongs to ids[i]
    joint.npy           float32 v/|v| (joint space: text queries)
    encoder.npy         float32 h/|h| (encoder space: image-to-image)
    joint.faiss         IndexIDMap2 over joint.npy (absent in a shard)
    encoder.faiss       IndexIDMap2 over encoder.npy (absent in a shard)
    meta.sqlite         one row per id: path, hash, size, metadata, report, thumbnail

The .npy files are the source of truth: add/remove/merge copy them instead of re-embedding, and
the FAISS files can be rebuilt from them with another --index-type (`convirt index reindex`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import faiss_index, layout, metadata
from .errors import IndexStoreError

VERSION_FORMAT = 1
INFO_NAME = "version.json"
REPORT_NAME = "build_report.json"
SPACES = ("joint", "encoder")


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
        return self.directory / metadata.META_DB

    def ids(self) -> np.ndarray:
        return np.load(self.directory / "ids.npy")

    def vectors(self, space: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.directory / f"{space}.npy", mmap_mode="r" if mmap else None)

    def faiss_index(self, space: str) -> faiss.Index:
        path = self.directory / f"{space}.faiss"
        if not path.is_file():
            raise IndexStoreError(f"{path} is missing: rebuild with `convirt index reindex`")
        index = faiss.read_index(str(path))
        faiss_index.tune_for_search(index)
        return index

    def report(self) -> dict[str, Any]:
        path = self.directory / REPORT_NAME
        return json.loads(path.read_text()) if path.is_file() else {}


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
    if info.get("format") != VERSION_FORMAT:
        raise IndexStoreError(
            f"{directory}: index format {info.get('format')!r}, this version reads "
            f"{VERSION_FORMAT}; rebuild the index with this version of convirt"
        )
    return VersionFiles(Path(directory), info)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class VersionWriter:
    """A new version assembled in a tmp dir, published with `publish`, discarded on error."""

    def __init__(self, root: Path, started: float | None = None):
        self.root = Path(root)
        self.name = layout.next_version_name(self.root)
        self.directory = layout.new_tmp_dir(self.root, self.name)
        try:
            self.meta = metadata.create(self.directory / metadata.META_DB)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)  # e.g. the disk is full
            raise
        self.started = time.perf_counter() if started is None else started

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    def discard(self) -> None:
        self.meta.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def publish(
        self,
        vectors: dict[str, np.ndarray],
        ids: np.ndarray,
        info: dict[str, Any],
        report: dict[str, Any],
        index_type: str | None,
    ) -> Path:
        """Write vectors, FAISS indexes (unless index_type is None: a shard), info and report."""
        order = np.argsort(ids, kind="stable")
        ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            raise IndexStoreError("two different images share one content id (a hash collision)")
        self._check_meta(ids)
        np.save(self.directory / "ids.npy", ids)
        factories, recall = {}, {}
        for space in SPACES:
            data = np.ascontiguousarray(vectors[space][order], dtype=np.float32)
            np.save(self.directory / f"{space}.npy", data)
            if index_type is not None:
                factories[space] = faiss_index.resolve_factory(index_type, len(ids), data.shape[1])
                index = faiss_index.build_index(factories[space], data, ids)
                faiss.write_index(index, str(self.directory / f"{space}.faiss"))
                recall[space] = faiss_index.measure_recall(index, data, ids)
        info = {
            **info,
            "format": VERSION_FORMAT,
            "version": self.name,
            "count": len(ids),
            "dims": {space: int(vectors[space].shape[1]) for space in SPACES},
            "index_type": index_type,
            "factory": factories or None,
            "recall_at_10": recall if any(v is not None for v in recall.values()) else None,
            "created_at": now_iso(),
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        (self.directory / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        report = {"version": self.name, **report}
        (self.directory / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        self.meta.close()
        return layout.publish_version(self.root, self.directory, self.name)

    def _check_meta(self, ids: np.ndarray) -> None:
        self.meta.commit()
        stored = [row[0] for row in self.meta.execute("SELECT id FROM images ORDER BY id")]
        if stored != ids.tolist():
            raise IndexStoreError("internal error: metadata rows and vectors disagree")
