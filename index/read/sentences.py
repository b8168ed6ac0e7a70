"""Report sentences of a published version, opened for searching: the third space, beside `joint`
and `encoder`, that text ranking (read/hybrid.py) and suggestions (read/suggest.py) read. How they
are derived and stored: index/write/sentences.py. And one report read the same way, for showing
it (read_report: its sentences where they stand in the text, with what each asserts)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from convirt.findings import content_words, read_sentence, stem
from convirt.sentences import sentence_spans

from ..metadata import SIDE_BITS
from ..version import SENTENCE_VECTORS


class SentenceSpace:
    """The sentences of one published version, opened for searching (thread-safe reads).

    Held in memory: the vectors (S x d float32) and, per sentence, whether it asserts anything,
    the sides it names and the word stems it denies (as postings: stem -> sentence ids); the
    (sentence, image) pairs sorted by sentence."""

    def __init__(self, directory: Path, db: sqlite3.Connection):
        rows = db.execute(
            "SELECT id, text, mentions, asserts, denies, sides FROM sentences ORDER BY id"
        )
        pairs = db.execute("SELECT sentence, image FROM sentence_images ORDER BY sentence")
        self._fill(np.load(Path(directory) / SENTENCE_VECTORS), rows, pairs.fetchall())

    @classmethod
    def assembled(cls, vectors: np.ndarray, rows: Iterable[tuple], pairs: list) -> SentenceSpace:
        """A space from its parts: vectors (S x d), rows (id, text, mentions, asserts, denies,
        sides) with ids 0..S-1 in order, (sentence, image) pairs sorted by sentence; how the
        sentences of several segments are served as one (index.read.segmented)."""
        space = cls.__new__(cls)
        space._fill(vectors, rows, pairs)
        return space

    def _fill(self, vectors: np.ndarray, rows: Iterable[tuple], pairs: list) -> None:
        count, dim = vectors.shape
        self.index = faiss.IndexFlatIP(dim)
        self.index.add(np.ascontiguousarray(vectors, np.float32))
        # read through the index's own copy, so the vectors are held once, not twice
        self.vectors = (
            faiss.rev_swig_ptr(self.index.get_xb(), count * dim).reshape(count, dim)
            if count
            else np.zeros((0, dim), np.float32)
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
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
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
        exact; single-threaded in the service's search pool, see service.model.threads)."""
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
    the model thread down (service.model.threads); these products are small."""
    return np.einsum("ij,j->i", rows, query.astype(rows.dtype, copy=False))


def has_space(db: sqlite3.Connection) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'report_terms'"
    ).fetchone()
    return row is not None


@dataclass(frozen=True)
class ReportSentence:
    """One sentence of a report as the index split it, where it stands in the report's text
    (start/end: character offsets, None where it cannot be placed), and the findings it names
    with what it asserts of each (convirt.findings: present, absent, uncertain, historical)."""

    text: str
    start: int | None
    end: int | None
    findings: list[tuple[str, str]]


def read_report(report: str) -> list[ReportSentence]:
    """A report's sentences, split and read by the same rules the index's sentences were
    (convirt.sentences.split_sentences, convirt.findings.read_sentence)."""
    read = []
    for text, start, end in sentence_spans(report):
        found = [(m.finding, m.status) for m in read_sentence(text).mentions]
        read.append(ReportSentence(text, start, end, list(dict.fromkeys(found))))
    return read
