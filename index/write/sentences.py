"""Report sentences: a version's third space, beside `joint` (images for text) and `encoder`.

A typed finding is better matched by what the archive's reports say than by the image alone, so
every version holds its reports' sentences, embedded by the text tower into the joint space, and
what each sentence asserts (convirt.findings: present, absent, uncertain, historical):

    sentences.npy                float32 S x d: u/|u| of sentence s at row s (joint space)
    meta.sqlite  sentences       id, text, mentions (JSON [[finding, status], ...]), asserts
                                 (1 when the sentence says something is there), denies (the
                                 words it says are absent), sides (1 left, 2 right, 3 both)
                 sentence_images sentence id, image id: which reports hold which sentence
                 report_terms    FTS5, rowid = image id: its report's words by what the report
                                 asserts of them (columns present, absent, uncertain, historical)

They are derived when a version is published, from the new version's own reports, so build, add,
remove, merge, sync and reindex all get them, and an image removed takes its sentences with it.
A sentence the previous version (or a shard) already embedded is copied, not embedded again.

This module writes them (at publish, index/write/template.py); index/read/sentences.py reads them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convirt.findings import STATUSES, Reading, content_words, read_sentence, side_of, words_of
from convirt.sentences import split_sentences

from .. import metadata
from ..errors import IndexStoreError
from ..metadata import FTS_TOKENIZE, META_DB, SIDE_BITS
from ..version import SENTENCE_VECTORS

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE sentences (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL UNIQUE,
    mentions TEXT NOT NULL DEFAULT '[]',
    asserts INTEGER NOT NULL DEFAULT 0,
    denies TEXT NOT NULL DEFAULT '',
    sides INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE sentence_images (sentence INTEGER NOT NULL, image INTEGER NOT NULL);
CREATE INDEX sentence_images_sentence ON sentence_images (sentence);
CREATE INDEX sentence_images_image ON sentence_images (image);
"""
FTS_SCHEMA = (
    "CREATE VIRTUAL TABLE report_terms USING fts5(present, absent, uncertain, historical, "
    f"content='', tokenize='{FTS_TOKENIZE}')"
)
EmbedTexts = Callable[[Sequence[str]], np.ndarray]


@dataclass
class Written:
    sentences: int
    embedded: int
    reused: int

    def as_info(self) -> dict[str, int]:
        return {"count": self.sentences, "embedded": self.embedded, "reused": self.reused}


def write(
    conn: sqlite3.Connection,
    directory: Path,
    dim: int,
    previous: Sequence[Path],
    embed: EmbedTexts | None,
) -> Written | None:
    """Derive the sentence space of the version being written in `directory` from its reports.

    previous: version directories whose sentence vectors may be reused (the parent, the shards);
    embed: texts -> joint-space vectors, for sentences none of them holds. Without it and with
    sentences to embed, the version is written without the space (searches fall back to the
    image alone) and a warning says how to add it; returns None then."""
    reports = metadata.reports(conn)
    order: dict[str, int] = {}
    links: list[tuple[int, int]] = []
    by_image: dict[int, list[str]] = {}
    for image_id, report in reports:
        for sentence in dict.fromkeys(split_sentences(report)):
            links.append((order.setdefault(sentence, len(order)), image_id))
            by_image.setdefault(image_id, []).append(sentence)
    texts = list(order)
    vectors = np.zeros((len(texts), dim), np.float32)
    missing = reuse(texts, vectors, previous)
    if len(missing) and embed is None:
        log.warning(
            "the reports' %d new sentences are not embedded (no model at hand): this version "
            "ranks text queries by the image alone; `convirt index build` or `add` with the "
            "model adds them",
            len(missing),
        )
        return None
    if len(missing):
        vectors[missing] = embed([texts[i] for i in missing])
    conn.executescript(SCHEMA)
    readings = [read_sentence(text) for text in texts]
    conn.executemany(
        "INSERT INTO sentences VALUES (?, ?, ?, ?, ?, ?)",
        ((i, t, *columns(t, r)) for i, (t, r) in enumerate(zip(texts, readings, strict=True))),
    )
    conn.executemany("INSERT INTO sentence_images VALUES (?, ?)", links)
    parts = {text: reading.parts for text, reading in zip(texts, readings, strict=True)}
    write_terms(conn, {image: [parts[s] for s in held] for image, held in by_image.items()})
    conn.commit()
    np.save(directory / SENTENCE_VECTORS, vectors)
    return Written(len(texts), len(missing), len(texts) - len(missing))


def columns(text: str, reading: Reading) -> tuple[str, int, str, int]:
    """(mentions as JSON, whether it asserts anything, the words it denies, the sides it names
    as bits) of one sentence."""
    found = [[m.finding, m.status] for m in reading.mentions]
    parts = reading.parts
    sides = sum(SIDE_BITS[side] for side in side_of(words_of(text)))
    return json.dumps(found), int(bool(content_words(parts["present"]))), parts["absent"], sides


def write_terms(conn: sqlite3.Connection, by_image: dict[int, list[dict[str, str]]]) -> None:
    """The FTS5 table of each report's words by status (the split_by_status parts of its
    sentences): `must` and lexical ranking read it."""
    try:
        conn.execute(FTS_SCHEMA)
    except sqlite3.OperationalError as err:
        raise IndexStoreError(
            f"report sentences need SQLite's FTS5, which this Python's sqlite3 lacks ({err})"
        ) from err

    def rows():
        for image_id, parts in by_image.items():
            yield (image_id, *(" . ".join(p[status] for p in parts) for status in STATUSES))

    conn.executemany(
        "INSERT INTO report_terms (rowid, present, absent, uncertain, historical) "
        "VALUES (?, ?, ?, ?, ?)",
        rows(),
    )
    conn.execute("INSERT INTO report_terms (report_terms) VALUES ('optimize')")


def reuse(texts: list[str], vectors: np.ndarray, previous: Sequence[Path]) -> np.ndarray:
    """Copy into `vectors` the rows earlier versions hold for these texts; the rows still
    missing (to embed)."""
    missing = np.ones(len(texts), bool)
    wanted = {text: i for i, text in enumerate(texts)}
    for directory in previous:
        path = Path(directory) / SENTENCE_VECTORS
        meta = Path(directory) / META_DB
        if not path.is_file() or not meta.is_file() or not missing.any():
            continue
        try:
            old = np.load(path, mmap_mode="r")
            conn = metadata.open_readonly(meta)
            try:
                rows = conn.execute("SELECT id, text FROM sentences").fetchall()
            finally:
                conn.close()
        except (OSError, ValueError, sqlite3.Error) as err:
            log.warning("sentence vectors of %s not reused: %s", directory, err)
            continue
        if old.ndim != 2 or old.shape[1] != vectors.shape[1]:
            continue
        pairs = [
            (wanted[text], row)
            for row, text in rows
            if text in wanted and missing[wanted[text]] and row < len(old)
        ]
        if pairs:
            new_rows, old_rows = (np.asarray(x) for x in zip(*pairs, strict=True))
            vectors[new_rows] = old[old_rows]
            missing[new_rows] = False
    return np.flatnonzero(missing)
