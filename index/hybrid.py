"""Text queries ranked by three kinds of evidence: the image, its report's sentences, its words.

The joint space has learnt anatomy and modality more than findings, while every indexed image
of a hospital comes with a report. So a text query is scored, per image, by

    image     cosine of the query to the image (joint space: what `mode=image` ranks by);
    sentence  cosine of the query to the nearest sentence of the image's report that agrees with
              it (report sentences in the joint space, index.sentences): for a query asking for a
              finding, a sentence that asserts nothing, or denies a word the query asks for, does
              not count ("no pleural effusion" is close to "pleural effusion" in any encoder);
              for a query asking for an absence ("no pneumothorax"), only sentences denying one
              of its words count;
    lexical   the share of the query's words, weighted by rarity (IDF), that the report asserts
              as asked (present, or absent for a negated query), read from the report_terms
              FTS5 table; BM25 orders reports that match equally.

and these are fused (FUSIONS): `weighted`, a weighted sum of the three (WEIGHTS, chosen on the
train splits: docs/results.md), or `rrf`, reciprocal rank fusion of the three rankings (k=60, as
Elasticsearch and OpenSearch do). An image without a report keeps its image score and has it
stand in for its sentences, so it still ranks. `mode=report` ranks by the report alone.

Every hit carries its Evidence, so a card can say why it ranked.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convirt.findings import QueryTerms, stem
from convirt.findings import query_terms as read_query

from .metadata import phrase
from .sentences import SentenceSpace

MODES = ("image", "report", "hybrid")
FUSIONS = ("weighted", "rrf")
SENTENCES_READ = 400  # nearest sentences read per query
LEXICAL_READ = 1000  # reports read per query word from the FTS5 table
IMAGES_READ = 200  # nearest images read per query (more when k is larger)
RRF_K = 60


@dataclass(frozen=True)
class Weights:
    image: float = 0.3
    sentence: float = 0.4
    lexical: float = 0.3


WEIGHTS = Weights()


@dataclass(frozen=True)
class Evidence:
    """Why an image ranked where it did for a text query."""

    image: float  # cosine of the image to the query
    sentence: str | None = None  # the report sentence nearest the query that agrees with it
    sentence_score: float | None = None
    terms: tuple[str, ...] = ()  # the query's words the report asserts as asked
    lexical: float = 0.0  # the IDF-weighted share of the query's words matched, 0..1
    has_report: bool = True


@dataclass
class Reports:
    """What a version's reports give a query: sentence and lexical evidence per image id."""

    sentence: dict[int, tuple[float, int]]  # image -> (cosine, sentence id)
    lexical: dict[int, tuple[float, float, tuple[str, ...]]]  # image -> (share, bm25, terms)


def query_terms(text: str) -> QueryTerms:
    return read_query(text)


def sentence_evidence(
    space: SentenceSpace, query: np.ndarray, terms: QueryTerms, allowed: Callable
) -> dict[int, tuple[float, int]]:
    """Per image, its best agreeing report sentence among the SENTENCES_READ nearest."""
    ids, scores = space.nearest(query, SENTENCES_READ)
    asked = {stem(w) for w in terms.present}
    denied = {stem(w) for w in terms.absent}
    best: dict[int, tuple[float, int]] = {}
    for sid, score in zip(ids.tolist(), scores.tolist(), strict=True):
        if terms.negated:
            if not denied & space.denies[sid]:
                continue
        elif not space.asserts[sid] or asked & space.denies[sid]:
            continue
        for image in allowed(space.images_of(sid)).tolist():
            if image not in best:
                best[image] = (score, sid)
    return best


def lexical_evidence(
    fts: sqlite3.Connection, terms: QueryTerms, allowed: Callable
) -> dict[int, tuple[float, float, tuple[str, ...]]]:
    """Per image, the IDF-weighted share of the query's words its report asserts as asked."""
    asked = [(word, "present") for word in terms.present]
    asked += [(word, "absent") for word in terms.absent]
    if not asked:
        return {}
    total = fts.execute("SELECT count(*) FROM report_terms").fetchone()[0] or 1
    matched: dict[int, list[str]] = {}
    weight: dict[int, float] = {}
    idf_sum = 0.0
    for word, column in asked:
        query = "SELECT rowid FROM report_terms WHERE report_terms MATCH ? LIMIT ?"
        rows = [r[0] for r in fts.execute(query, (f"{{{column}}} : {phrase(word)}", LEXICAL_READ))]
        idf = math.log(1 + total / (1 + len(rows)))
        idf_sum += idf
        for image in rows:
            matched.setdefault(image, []).append(word)
            weight[image] = weight.get(image, 0.0) + idf
    if not matched:
        return {}
    expression = " OR ".join(f"{{{column}}} : {phrase(word)}" for word, column in asked)
    bm25 = dict(
        fts.execute(
            "SELECT rowid, -bm25(report_terms) FROM report_terms WHERE report_terms MATCH ? "
            "ORDER BY rank LIMIT ?",
            (expression, LEXICAL_READ),
        ).fetchall()
    )
    ids = allowed(np.fromiter(matched, dtype=np.int64, count=len(matched))).tolist()
    return {i: (weight[i] / idf_sum, float(bm25.get(i, 0.0)), tuple(matched[i])) for i in ids}


def fuse(
    candidates: np.ndarray,
    image_scores: np.ndarray,
    reports: Reports,
    reported: Callable[[np.ndarray], np.ndarray],
    mode: str,
    fusion: str,
    weights: Weights = WEIGHTS,
) -> np.ndarray:
    """The fused score of each candidate image (same order)."""
    sentence = np.array([reports.sentence.get(i, (0.0, -1))[0] for i in candidates.tolist()])
    lexical = np.array([reports.lexical.get(i, (0.0, 0.0, ()))[0] for i in candidates.tolist()])
    bm25 = np.array([reports.lexical.get(i, (0.0, 0.0, ()))[1] for i in candidates.tolist()])
    has_report = reported(candidates)
    if fusion == "rrf":
        lists = [sentence, lexical + 1e-3 * bm25 / max(float(bm25.max(initial=0)), 1e-9)]
        present = [sentence > 0, lexical > 0]
        if mode == "hybrid":
            lists.append(image_scores)
            present.append(np.ones(len(candidates), bool))
        score = np.zeros(len(candidates))
        for values, there in zip(lists, present, strict=True):
            order = np.lexsort((candidates, -values))
            ranks = np.empty(len(values))
            ranks[order] = np.arange(1, len(values) + 1)
            score += np.where(there, 1.0 / (RRF_K + ranks), 0.0)
        return score
    image_weight = weights.image if mode == "hybrid" else 0.0
    stand_in = np.where(has_report, sentence, image_scores if mode == "hybrid" else 0.0)
    return (
        image_weight * image_scores
        + weights.sentence * stand_in
        + weights.lexical * (lexical + 1e-3 * np.minimum(bm25, 50.0) / 50.0)
    )


def evidence_of(
    image_id: int, image_score: float, reports: Reports, space: SentenceSpace, has_report: bool
) -> Evidence:
    sentence = reports.sentence.get(image_id)
    lexical = reports.lexical.get(image_id)
    return Evidence(
        image=round(float(image_score), 6),
        sentence=space.texts[sentence[1]] if sentence else None,
        sentence_score=round(float(sentence[0]), 6) if sentence else None,
        terms=lexical[2] if lexical else (),
        lexical=round(float(lexical[0]), 6) if lexical else 0.0,
        has_report=has_report,
    )


class TextRanking:
    """One text query's evidence over a version: its best images, and the fused score of any
    image (to complete a study's card with its other images, scored the same way)."""

    def __init__(
        self,
        space: SentenceSpace,
        joint: Callable[[list[int]], np.ndarray],
        query: np.ndarray,
        reports: Reports,
        image_hits: list,
        mode: str,
        fusion: str,
        weights: Weights = WEIGHTS,
    ):
        self.space, self.joint, self.query = space, joint, query
        self.reports, self.mode, self.fusion, self.weights = reports, mode, fusion, weights
        pool = set(reports.sentence) | set(reports.lexical)
        if mode == "hybrid":
            pool |= {hit.id for hit in image_hits}
        self.candidates = np.asarray(sorted(pool), dtype=np.int64)
        self.ranked = self.score(self.candidates)

    def reported(self, ids: np.ndarray) -> np.ndarray:
        rows = np.minimum(np.searchsorted(self.space.reported, ids), len(self.space.reported) - 1)
        if len(self.space.reported) == 0:
            return np.zeros(len(ids), bool)
        return self.space.reported[rows] == ids

    def score(self, ids: np.ndarray) -> list:
        """Hits for these ids, best first, each with its Evidence."""
        from .store import Hit  # the store imports this module

        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return []
        image_scores = self.joint(ids.tolist()) @ self.query
        fused = fuse(
            ids, image_scores, self.reports, self.reported, self.mode, self.fusion, self.weights
        )
        has_report = self.reported(ids)
        order = np.lexsort((ids, -fused))
        return [
            Hit(
                int(ids[i]),
                round(float(fused[i]), 6),
                evidence_of(
                    int(ids[i]), image_scores[i], self.reports, self.space, bool(has_report[i])
                ),
            )
            for i in order
            if self.mode == "hybrid" or fused[i] > 0
        ]

    def top(self, k: int) -> list:
        return self.ranked[:k]
