"""The one template of every index write (build, add, remove, reindex, merge, sync):

    with writing(root, "add", from_current=True, keep=3) as w:
        w.current                      # the version being served (from_current=True)
        w.needs(lambda: bytes_needed)  # the estimate a disk-full error reports
        staging = w.staging(Staging(...))   # closed on exit, removed once the version is out
        w.meta                         # the new version's meta.sqlite (its tmp dir made on first use)
        w.publish(vectors, ids, info, outcome, index_type)  # or nothing: CURRENT stays
    w.summary                          # what the operation did (Summary.line() for the CLI)

It holds ROOT/.lock, removes versions left half-written by a crashed writer, turns running out of
disk into DiskFullError, publishes atomically (the version directory is renamed into place, then
CURRENT switched), prunes old versions and removes the staging area. On any error the tmp version
is discarded and CURRENT still names the old version; the staging area stays for a rerun.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import compressed, faiss_index, layout
from ..errors import IndexStoreError
from ..fields import FIELDS_VERSION
from ..metadata import META_DB
from ..version import (
    INFO_FORMAT,
    INFO_NAME,
    OUTCOME_NAME,
    SPACES,
    VersionFiles,
    checksums,
    read_version,
)
from . import lookups, rows, sentences
from .staging import Staging


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class VersionWriter:
    """A new version assembled in a tmp dir, published with `publish`, discarded on error."""

    def __init__(self, root: Path, started: float | None = None):
        self.root = Path(root)
        self.name = layout.next_version_name(self.root)
        self.directory = layout.new_tmp_dir(self.root, self.name)
        try:
            self.meta = rows.create(self.directory / META_DB)
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
        index_type: str | None,
        *,  # version.json and build_report.json: two dicts, by name so never swapped
        info: dict[str, Any],
        outcome: dict[str, Any],
        previous: Sequence[Path] = (),
        embed_texts: sentences.EmbedTexts | None = None,
        as_segment: bool = False,
    ) -> Path:
        """Write vectors, FAISS indexes (unless index_type is None: a shard), the report
        sentences (reusing the vectors of `previous` versions of the same model, embedding the
        rest with `embed_texts`), info (version.json) and outcome (build_report.json). As a
        segment it goes to ROOT/segments/NAME and CURRENT stays (write/segments.py lists it)."""
        order = np.argsort(ids, kind="stable")
        ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            raise IndexStoreError("two different images share one content id (a hash collision)")
        self._check_meta(ids)
        np.save(self.directory / "ids.npy", ids)
        factories, recall = {}, {}
        # what `auto` stands for, chosen once for every space within the RAM budget
        dims = [int(vectors[space].shape[1]) for space in SPACES]
        auto_as = faiss_index.choose_auto(len(ids), dims, info.get("ram_budget"))
        for space in SPACES:
            data = np.ascontiguousarray(vectors[space][order], dtype=np.float32)
            if index_type is None:  # a shard: vectors only, indexed when merged
                np.save(self.directory / f"{space}.npy", data)
                continue
            factories[space] = faiss_index.resolve_factory(
                index_type, len(ids), data.shape[1], auto_as
            )
            if not compressed.is_compressed(factories[space]):
                # a compressed index's float16 copy ({space}.f16.npy) is the only one it keeps
                np.save(self.directory / f"{space}.npy", data)
            index = faiss_index.build_index(factories[space], data, ids)
            faiss_index.write_index(index, self.directory, space)
            recall[space] = faiss_index.measure_recall(index, data, ids)
        same_model = [p for p in previous if same_fingerprint(p, info.get("fingerprint"))]
        dim = int(vectors["joint"].shape[1])
        rows.derive_fields(self.meta)  # index.fields: one modality and body part vocabulary
        written = sentences.write(self.meta, self.directory, dim, same_model, embed_texts)
        lookups.write(self.meta)  # facets and field tables: no reader scans every row
        lookups.check(self.meta)  # every page read once here, not at each start (read/opening)
        info = {
            **info,
            "format": INFO_FORMAT,
            "version": self.name,
            "count": len(ids),
            "dims": {space: int(vectors[space].shape[1]) for space in SPACES},
            "index_type": index_type,
            "factory": factories or None,
            "recall_at_10": recall if any(v is not None for v in recall.values()) else None,
            "created_at": now_iso(),
            "seconds": round(time.perf_counter() - self.started, 3),
            "sentences": written.as_info() if written else None,
            "fields": FIELDS_VERSION,
            "checksums": checksums(self.directory),
        }
        (self.directory / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        outcome = {"version": self.name, **outcome}
        (self.directory / OUTCOME_NAME).write_text(json.dumps(outcome, indent=2) + "\n")
        self.meta.close()
        if as_segment:
            return layout.publish_segment(self.root, self.directory, self.name)
        return layout.publish_version(self.root, self.directory, self.name)

    def _check_meta(self, ids: np.ndarray) -> None:
        self.meta.commit()
        if rows.sorted_ids(self.meta) != ids.tolist():
            raise IndexStoreError("internal error: metadata rows and vectors disagree")


def same_fingerprint(directory: Path, fingerprint: str | None) -> bool:
    """Whether the version in `directory` was embedded by the model `fingerprint` names."""
    try:
        return read_version(directory).fingerprint == fingerprint
    except (IndexStoreError, KeyError):
        return False


# -- the one template of every write ---------------------------------------------------------------


@dataclass
class Summary:
    """What an operation did; `line()` is the one-line account the CLI prints."""

    operation: str
    version: str
    directory: Path
    count: int
    changes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    published: bool = True  # False: nothing changed, CURRENT still names `version`
    compaction: Summary | None = None  # the policy's merge that followed (write/compact.py)

    def line(self) -> str:
        if self.compaction is not None:
            return f"{self._line()}\nthen {self.compaction._line()}"
        return self._line()

    def _line(self) -> str:
        done = ", ".join(f"{n} {what}" for what, n in self.changes.items() if n)
        if not self.published:
            return (
                f"{self.operation}: nothing changed{f' ({done})' if done else ''}; version "
                f"{self.version} with {self.count} images stays current ({self.seconds:.1f}s)"
            )
        return (
            f"{self.operation}: version {self.version} with {self.count} images"
            f"{f' ({done})' if done else ''} in {self.seconds:.1f}s; "
            f"report: {self.directory / OUTCOME_NAME}"
        )


def open_writable_current(root: Path) -> VersionFiles:
    """The version being served, refused when it is a shard (shards are only merged)."""
    current = read_version(layout.current_version_dir(root))
    if current.info.get("shard"):
        shard = current.info["shard"]
        raise IndexStoreError(
            f"{root} holds shard {shard['index']}/{shard['count']} of a sharded build: "
            "merge the shards into an index first (`convirt index merge --out ROOT SHARD...`)"
        )
    return current


class Write:
    """One write operation on an index root, from its lock to its summary (see `writing`)."""

    def __init__(self, root: Path, operation: str, keep: int, started: float):
        self.root, self.operation, self.keep, self.started = root, operation, keep, started
        self.parent = layout.read_current(root)  # the version this one follows, if any
        self.current: VersionFiles | None = None
        self.summary: Summary | None = None
        self._needed: Callable[[], int] = lambda: 0
        self._writer: VersionWriter | None = None
        self._writer_done = False  # its tmp dir was renamed into a segment
        self._stagings: list[Staging] = []
        self._directory: Path | None = None
        self._changes: dict[str, int] = {}
        # report sentences: texts -> joint vectors for those no earlier version holds (set by
        # the operations that load a model), and where earlier vectors may be found
        self.embed_texts: sentences.EmbedTexts | None = None
        self.reuse_from: list[Path] = []
        if self.parent is not None:
            self.reuse_from.append(layout.versions_dir(root) / self.parent)

    def needs(self, estimate: Callable[[], int]) -> None:
        """About the bytes this write takes (asked only when a write fails for want of space)."""
        self._needed = estimate

    def needed(self) -> int:
        return self._needed()

    def staging(self, staging: Staging) -> Staging:
        """Embeddings of this job: closed when the write ends, removed once it is published."""
        self._stagings.append(staging)
        return staging

    def writer(self) -> VersionWriter:
        """The new version, assembled in a tmp dir (made on first use)."""
        if self._writer is None:
            self._writer = VersionWriter(self.root, self.started)
        return self._writer

    @property
    def meta(self):
        """The new version's metadata connection (meta.sqlite)."""
        return self.writer().meta

    @property
    def published(self) -> bool:
        return self._directory is not None

    def publish(
        self,
        vectors: dict[str, np.ndarray],
        ids: np.ndarray,
        info: dict[str, Any],
        outcome: dict[str, Any],
        index_type: str | None,
        changes: dict[str, int] | None = None,
        as_segment: bool = False,
    ) -> Path:
        """Write the new version and switch CURRENT to it. `info` and `outcome` get this
        operation's name and parent; `changes` (default: the outcome's counts) go to the summary.
        as_segment: write it as a segment only (segments.publish_listing then publishes it)."""
        info = {**info, "operation": self.operation, "parent": self.parent}
        outcome = {"operation": self.operation, **outcome}
        written = self.writer().publish(
            vectors,
            ids,
            index_type,
            info=info,
            outcome=outcome,
            previous=self.reuse_from,
            embed_texts=self.embed_texts,
            as_segment=as_segment,
        )
        if as_segment:
            self._writer_done = True
            return written
        self.published_as(written, dict(outcome.get("counts", {}) if changes is None else changes))
        return written

    def published_as(self, directory: Path, changes: dict[str, int]) -> None:
        """Record the version this write published (directory) and what it changed."""
        self._directory, self._changes = directory, dict(changes)

    def unchanged(self, changes: dict[str, int] | None = None) -> None:
        """Publish nothing: the summary names the current version (what was checked: changes)."""
        self._changes = dict(changes or {})

    def _finish(self) -> None:
        if self.published:
            for staging in self._stagings:
                staging.remove()
            layout.prune_versions(self.root, self.keep)
            directory = self._directory
        else:
            directory = layout.current_version_dir(self.root)
        info = read_version(directory).info
        self.summary = Summary(
            self.operation,
            info["version"],
            directory,
            info["count"],
            self._changes,
            time.perf_counter() - self.started,
            self.published,
        )

    def _close(self) -> None:
        if self._writer is not None and not self.published and not self._writer_done:
            self._writer.discard()
        for staging in self._stagings:
            staging.close()


@contextmanager
def writing(
    root: str | Path,
    operation: str,
    *,
    from_current: bool = False,
    keep: int = layout.KEEP_VERSIONS,
    started: float | None = None,
) -> Iterator[Write]:
    """Lock ROOT, run the body, publish what it wrote atomically, prune, summarise.

    from_current: the body derives the new version from the one being served (`w.current`;
    an error when there is none or it is a shard). On any error nothing is published, the tmp
    version is removed and the staging area kept (a rerun resumes); a write that failed for want
    of space raises DiskFullError naming the disk, the space free and `w.needs`' estimate."""
    root = Path(root)
    started = time.perf_counter() if started is None else started
    with layout.write_lock(root):
        layout.remove_tmp_dirs(root)
        write = Write(root, operation, keep, started)
        if from_current:
            write.current = open_writable_current(root)
        with layout.disk_full_as_error(root, operation, write.needed):
            try:
                yield write
                write._finish()
            finally:
                write._close()


def version_bytes(files: VersionFiles) -> int:
    """The size of a published version: what a copy of it (add, remove, reindex) takes."""
    return layout.tree_bytes(files.directory)
