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
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from convirt.findings import (
    STATUSES,
    Reading,
    content_words,
    read_sentence,
    side_of,
    stem,
    words_of,
)
from convirt.sentences import split_sentences

from . import metadata

log = logging.getLogger(__name__)
VECTORS = "sentences.npy"
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
    f"content='', tokenize='{metadata.FTS_TOKENIZE}')"
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
    np.save(directory / VECTORS, vectors)
    return Written(len(texts), len(missing), len(texts) - len(missing))


SIDE_BITS = {"left": 1, "right": 2}


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
        raise metadata.IndexStoreError(
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
        path = Path(directory) / VECTORS
        meta = Path(directory) / metadata.META_DB
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


# -- read side -------------------------------------------------------------------------------------


class SentenceSpace:
    """The sentences of one published version, opened for searching (thread-safe reads).

    Held in memory: the vectors (S x d float32) and, per sentence, whether it asserts anything,
    the sides it names and the word stems it denies (as postings: stem -> sentence ids); the
    (sentence, image) pairs sorted by sentence."""

    def __init__(self, directory: Path, db: sqlite3.Connection):
        self.vectors = np.load(Path(directory) / VECTORS)
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(np.ascontiguousarray(self.vectors, np.float32))
        rows = db.execute(
            "SELECT id, text, mentions, asserts, denies, sides FROM sentences ORDER BY id"
        )
        self.texts: list[str] = []
        self.mentions: list[str] = []
        denying: dict[str, list[int]] = {}
        asserts, sides = [], []
        for i, (sid, text, found, flag, denied, side) in enumerate(rows):
            if sid != i:
                raise ValueError(f"sentence ids are not 0..S-1 (id {sid} at row {i})")
            self.texts.append(text)
            self.mentions.append(found)
            for word in {stem(w) for w in content_words(denied)}:
                denying.setdefault(word, []).append(i)
            asserts.append(bool(flag))
            sides.append(side)
        self.asserts = np.asarray(asserts, bool)
        self.sides = np.asarray(sides, np.uint8)
        self.denying = {word: np.asarray(ids, np.int64) for word, ids in denying.items()}
        if len(self.texts) != len(self.vectors):
            raise ValueError(
                f"{len(self.vectors)} sentence vectors for {len(self.texts)} sentences"
            )
        pairs = np.asarray(
            db.execute("SELECT sentence, image FROM sentence_images ORDER BY sentence").fetchall(),
            dtype=np.int64,
        ).reshape(-1, 2)
        self.offsets = np.searchsorted(pairs[:, 0], np.arange(len(self.texts) + 1))
        self.pair_sentence = pairs[:, 0].copy()
        self.images = pairs[:, 1].copy()
        self.reported = np.unique(self.images)  # the images whose report has a sentence
        order = np.argsort(self.images, kind="stable")  # the pairs by image
        self._by_image = self.images[order]
        self._sentence_at = pairs[order, 0].copy()

    def __len__(self) -> int:
        return len(self.texts)

    def scores_of(self, sentences: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Cosine of some sentences to a unit query vector."""
        return dot(self.vectors[sentences], query)

    def nearest(self, query: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The m sentences nearest to a unit query vector: (ids, cosine), best first (FAISS,
        exact; single-threaded in the service's search pool, see service.threads)."""
        if len(self.texts) == 0 or m < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores, ids = self.index.search(np.ascontiguousarray(query[None], np.float32), m)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def denying_any(self, stems: set[str]) -> np.ndarray:
        """Per sentence, whether it denies one of these word stems."""
        mask = np.zeros(len(self.texts), bool)
        for word in stems:
            mask[self.denying.get(word, [])] = True
        return mask

    def naming_side(self, side: str) -> np.ndarray:
        """Per sentence, whether it names no side, or this one."""
        return (self.sides == 0) | ((self.sides & SIDE_BITS[side]) != 0)

    def sentences_of(self, image: int) -> np.ndarray:
        """The sentence ids of one image's report."""
        first, last = np.searchsorted(self._by_image, [image, image + 1])
        return self._sentence_at[first:last]

    def images_of(self, sentence: int) -> np.ndarray:
        return self.images[self.offsets[sentence] : self.offsets[sentence + 1]]

    def findings_of(self, sentence: int) -> list[tuple[str, str]]:
        return [tuple(pair) for pair in json.loads(self.mentions[sentence])]


def dot(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """rows @ query without BLAS: numpy's BLAS runs its own threads, which on a few cores slow
    the model thread down (service.threads); these products are small."""
    return np.einsum("ij,j->i", rows, query.astype(rows.dtype, copy=False))


def has_space(db: sqlite3.Connection) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'report_terms'"
    ).fetchone()
    return row is not None
