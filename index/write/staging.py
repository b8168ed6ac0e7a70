"""Embeddings of an unfinished job, by content hash, in one SQLite file (resume after a crash).

What is staged is each image's record (convirt.imagerecord), vectors included: what the finished
version's metadata row is written from.

The job commits a chunk of whole batches per transaction. A kill -9 loses at most the chunk being
written (SQLite rolls it back on the next open); a rerun skips every hash already here.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np

from convirt.imagerecord import ImageRecord

from ..errors import IndexStoreError

STAGING_DB = "embedded.sqlite"
# How long a commit waits for a reader or another writer of the staging file (seconds).
BUSY_TIMEOUT_S = 120.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS embedded (
    sha256 TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    file_meta TEXT NOT NULL,  -- the record's header
    thumbnail BLOB NOT NULL,
    encoder BLOB NOT NULL,
    joint BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Staging:
    def __init__(self, directory: Path, fingerprint: str, dims: tuple[int, int]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / STAGING_DB
        self.dims = dims
        self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        self.conn.execute("PRAGMA journal_mode=WAL")
        with self.conn:
            self.conn.executescript(SCHEMA)
            self._check_info({"fingerprint": fingerprint, "dims": json.dumps(list(dims))})

    def _check_info(self, expected: dict[str, str]) -> None:
        recorded = dict(self.conn.execute("SELECT key, value FROM info"))
        if not recorded:
            self.conn.executemany("INSERT INTO info VALUES (?, ?)", expected.items())
        elif recorded != expected:
            raise IndexStoreError(
                f"staging area {self.directory} holds embeddings of another model "
                f"({recorded}); delete that directory and run again"
            )

    def hashes(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT sha256 FROM embedded")}

    def put(self, records: list[ImageRecord]) -> None:
        """Store one chunk of embedded records in one transaction."""
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO embedded VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.sha256,
                        r.size_bytes,
                        r.width,
                        r.height,
                        json.dumps(r.header),
                        r.thumbnail,
                        _blob(r.encoder),
                        _blob(r.joint),
                    )
                    for r in records
                ],
            )

    def get(self, sha256: str) -> ImageRecord:
        row = self.conn.execute(
            "SELECT size_bytes, width, height, file_meta, thumbnail, encoder, joint "
            "FROM embedded WHERE sha256 = ?",
            (sha256,),
        ).fetchone()
        if row is None:
            raise IndexStoreError(f"staging area {self.directory} lost the embedding of {sha256}")
        size, width, height, header, thumbnail, encoder, joint = row
        return ImageRecord(
            sha256,
            size,
            width,
            height,
            json.loads(header),
            bytes(thumbnail),
            np.frombuffer(encoder, np.float32),
            np.frombuffer(joint, np.float32),
        )

    def close(self) -> None:
        self.conn.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()
