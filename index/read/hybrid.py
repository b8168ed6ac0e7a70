"""Text queries ranked by three kinds of evidence: the image, its report's sentences, its words.

The joint space has learnt anatomy and modality more than findings, while every indexed image
of a hospital comes with a report. So a text query is scored, per image, by

    image     cosine of the query to the image (joint space: what `mode=image` ranks by);
    sentence  cosine of the query to the nearest sentence of the image's report that agrees with
              it (report sentences in the joint space, index.read.sentences): for a query asking for a
              finding, a sentence that asserts nothing, or denies a word the query asks for, does
              not count ("no pleural effusion" is close to "pleural effusion" in any encoder);
              for a query asking for an absence ("no pneumothorax"), only sentences denying one
              of its words count;
    lexical   the share of the query's words and named findings, weighted by rarity (IDF), that
              the report asserts as asked (present, or absent for a negated query), read from
              the report_terms FTS5 table; a finding matches by any of its synonyms
              (convirt/findings.yaml: "free air" is "pneumoperitoneum" too) and counts
              FINDING_WEIGHT times a word; BM25 orders reports that match equally.

and these are fused (FUSIONS): `weighted`, a weighted sum of the three (WEIGHTS, chosen on the
train splits: docs/results.md), or `rrf`, reciprocal rank fusion of the three rankings (k=60, as
Elasticsearch and OpenSearch do). An image without a report keeps its image score and has it
stand in for its sentences, so it still ranks. `mode=report` ranks by the report alone.

Every hit carries its Evidence, so a card can say why it ranked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from convirt.findings import QueryTerms, read_rules, stem

from .keywords import ReportTerms, phrase
from .search import Hit
from .sentences import SentenceSpace, dot

MODES = ("image", "report", "hybrid")
FUSIONS = ("weighted", "rrf")
SENTENCES_READ = 400  # nearest sentences read per query
LEXICAL_READ = 1000  # reports read per query word from the FTS5 table
LEXICAL_TERMS = 12  # words and findings matched at most: the findings first, then the words
IMAGES_READ = 20  # nearest images read per query (more when k is larger): FAISS's fast path
RRF_K = 60
FINDING_WEIGHT = 1.0  # a finding the query names counts as much as a word (chosen on train)


@dataclass(frozen=True)
class Weights:
    """Chosen on the train splits (`python bench/finding_search.py --split train --tune`: 363
    medpix diagnosis and covid-cxr finding queries, mean P@5 over a 0.1 grid; docs/results.md)."""

    image: float = 0.2
    sentence: float = 0.2
    lexical: float = 0.6


WEIGHTS = Weights()


@dataclass(frozen=True)
class Evidence:
    """Why an image ranked where it did for a text query."""

    image: float  # cosine of the image to the query
    sentence: str | None = None  # the report sentence nearest the query that agrees with it
    sentence_score: float | None = None
    terms: tuple[str, ...] = ()  # the query's words and findings the report asserts as asked
    lexical: float = 0.0  # the IDF-weighted share of the query's words matched, 0..1
    has_report: bool = True


class Reports:
    """What a version's reports give a query, per image id (arrays sorted by id): its best
    agreeing sentence (cosine, sentence id) and its lexical share, with the ids each asked
    word or finding matched."""

    def __init__(
        self,
        sentence: dict[int, tuple[float, int]],
        lexical: tuple[np.ndarray, np.ndarray],
        matches: list[tuple[str, np.ndarray]] = (),
    ):
        self.sentence_ids = np.fromiter(sentence, dtype=np.int64, count=len(sentence))
        order = np.argsort(self.sentence_ids)
        self.sentence_ids = self.sentence_ids[order]
        values = list(sentence.values())
        self.sentence_scores = np.array([v[0] for v in values], np.float64)[order]
        self.sentence_rows = np.array([v[1] for v in values], np.int64)[order]
        self.lexical_ids, self.lexical_shares = lexical
        self.matches = list(matches)

    @property
    def images(self) -> np.ndarray:
        return np.union1d(self.sentence_ids, self.lexical_ids)

    def sentence_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine, sentence id) per image; 0 and -1 where none agrees."""
        found, rows = lookup(self.sentence_ids, ids)
        if len(self.sentence_ids) == 0:
            return np.zeros(len(found)), np.full(len(found), -1, np.int64)
        return (
            np.where(found, self.sentence_scores[rows], 0.0),
            np.where(found, self.sentence_rows[rows], -1),
        )

    def lexical_of(self, ids: np.ndarray) -> np.ndarray:
        found, rows = lookup(self.lexical_ids, ids)
        if len(self.lexical_ids) == 0:
            return np.zeros(len(found))
        return np.where(found, self.lexical_shares[rows], 0.0)


def lookup(keys: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """(found, row) of each id in the sorted array keys."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(keys) == 0:
        return np.zeros(len(ids), bool), np.zeros(len(ids), np.int64)
    rows = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
    return keys[rows] == ids, rows


def sentence_evidence(
    space: SentenceSpace,
    query: np.ndarray,
    terms: QueryTerms,
    passes: Callable[[np.ndarray], np.ndarray],
    also: Iterable[int] = (),
) -> dict[int, tuple[float, int]]:
    """Per image, its best agreeing report sentence: among the SENTENCES_READ nearest the query,
    and among all the sentences of the images in `also` (those other evidence found). For a
    query asking for something, a sentence agrees when it asserts something and denies none of
    the query's words, on the side the query names if it names one; for a query asking for an
    absence, when it denies one of its words. `passes`: ids -> mask of those the query may
    return (filters, keywords, exclusions)."""
    asked = {stem(w) for w in terms.present}
    asked |= {stem(w) for name in terms.findings for w in name.split()}
    denied = {stem(w) for w in terms.absent}
    denied |= {stem(w) for name in terms.denied_findings for w in name.split()}
    if terms.negated:
        agrees = space.denying_any(denied)
    else:
        agrees = space.asserts & ~space.denying_any(asked)
    if terms.side:
        agrees &= space.naming_side(terms.side)
    top, top_scores = space.nearest(query, SENTENCES_READ)
    read = np.zeros(len(space), bool)
    read[top] = True
    pairs = read[space.pair_sentence]
    others = np.fromiter(also, dtype=np.int64)
    if len(others):
        pairs |= np.isin(space.images, others)
    pairs &= agrees[space.pair_sentence]
    chosen = np.flatnonzero(pairs)
    chosen = chosen[passes(space.images[chosen])]
    images, sentences = space.images[chosen], space.pair_sentence[chosen]
    scores = np.zeros(len(space), np.float32)
    scores[top] = top_scores
    rest = np.setdiff1d(sentences, top)
    scores[rest] = space.scores_of(rest, query)
    values = scores[sentences]
    order = np.lexsort((sentences, -values, images))  # by image, its best sentence first
    first = order[np.r_[True, images[order][1:] != images[order][:-1]]] if len(order) else order
    return dict(
        zip(
            images[first].tolist(),
            zip(values[first].tolist(), sentences[first].tolist(), strict=True),
            strict=True,
        )
    )


def lexical_terms(terms: QueryTerms) -> list[tuple[str, str, float]]:
    """(what matched, FTS5 expression, weight) of each word and finding the query asks for: a
    word in the column of the status asked (present, or absent for a denied one), a finding as
    any of its phrases (its synonyms), counting FINDING_WEIGHT times a word."""
    rules = read_rules()
    asked = [(w, f"{{present}} : {phrase(w)}", 1.0) for w in terms.present]
    asked += [(w, f"{{absent}} : {phrase(w)}", 1.0) for w in terms.absent]
    for names, column in ((terms.findings, "present"), (terms.denied_findings, "absent")):
        for name in names:
            either = " OR ".join(phrase(p) for p in rules.phrases(name))
            asked.insert(0, (name, f"{{{column}}} : ({either})", FINDING_WEIGHT))
    return asked[:LEXICAL_TERMS]


def lexical_evidence(
    fts: ReportTerms, terms: QueryTerms, passes: Callable[[np.ndarray], np.ndarray]
) -> tuple[tuple[np.ndarray, np.ndarray], list[tuple[str, np.ndarray]]]:
    """((ids, share) of the images whose report asserts some of the query's words and findings
    as asked, share = their IDF-weighted part of all, sorted by id; [(word or finding, ids
    matching it)]). FTS5 finds the reports; the share is BM25's IDF sum without its
    term-frequency and length terms, which say little of one-line report sentences."""
    asked = lexical_terms(terms)
    empty = (np.zeros(0, np.int64), np.zeros(0))
    if not asked:
        return empty, []
    total = fts.count() or 1
    matches, parts, weights = [], [], []
    idf_sum = 0.0
    for label, expression, times in asked:
        rows = fts.matching(expression, LEXICAL_READ)
        idf = times * math.log(1 + total / (1 + len(rows)))
        idf_sum += idf
        rows = np.sort(rows[passes(rows)])
        matches.append((label, rows))
        parts.append(rows)
        weights.append(np.full(len(rows), idf))
    every = np.concatenate(parts)
    if len(every) == 0:
        return empty, matches
    ids, inverse = np.unique(every, return_inverse=True)
    shares = np.bincount(inverse, weights=np.concatenate(weights), minlength=len(ids)) / idf_sum
    return (ids, shares), matches


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
    sentence, _ = reports.sentence_of(candidates)
    lexical = reports.lexical_of(candidates)
    has_report = reported(candidates)
    if fusion == "rrf":
        lists = [sentence, lexical]
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
    return image_weight * image_scores + weights.sentence * stand_in + weights.lexical * lexical


def evidences(
    ids: np.ndarray,
    image_scores: np.ndarray,
    reports: Reports,
    space: SentenceSpace,
    has_report: np.ndarray,
) -> list[Evidence]:
    """The Evidence of each image, in order."""
    scores, sids = reports.sentence_of(ids)
    shares = reports.lexical_of(ids)
    hits = [(label, np.isin(ids, matched)) for label, matched in reports.matches]
    return [
        Evidence(
            image=round(float(image_scores[n]), 6),
            sentence=space.texts[sids[n]] if sids[n] >= 0 else None,
            sentence_score=round(float(scores[n]), 6) if sids[n] >= 0 else None,
            terms=tuple(label for label, found in hits if found[n]),
            lexical=round(float(shares[n]), 6),
            has_report=bool(has_report[n]),
        )
        for n in range(len(ids))
    ]


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
        weights: Weights | None = None,
    ):
        weights = weights or WEIGHTS  # read when called: a benchmark may set the module's
        self.space, self.joint, self.query = space, joint, query
        self.reports, self.mode, self.fusion, self.weights = reports, mode, fusion, weights
        pool = reports.images
        if mode == "hybrid":
            pool = np.union1d(pool, np.array([hit.id for hit in image_hits], np.int64))
        self.candidates = pool
        self.ranked = self.fused(self.candidates)

    def reported(self, ids: np.ndarray) -> np.ndarray:
        rows = np.minimum(np.searchsorted(self.space.reported, ids), len(self.space.reported) - 1)
        if len(self.space.reported) == 0:
            return np.zeros(len(ids), bool)
        return self.space.reported[rows] == ids

    def fused(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids best first, their fused scores, their image scores) of these ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return ids, np.zeros(0), np.zeros(0)
        image_scores = dot(self.joint(ids.tolist()), self.query)
        fused = fuse(
            ids, image_scores, self.reports, self.reported, self.mode, self.fusion, self.weights
        )
        order = np.lexsort((ids, -fused))
        if self.mode != "hybrid":
            order = order[fused[order] > 0]
        return ids[order], fused[order], image_scores[order]

    def score(self, ids: np.ndarray) -> list:
        """Hits for these ids, best first (no evidence: see `top`)."""
        ranked, fused, _ = self.fused(ids)
        return [Hit(int(i), round(float(f), 6)) for i, f in zip(ranked, fused, strict=True)]

    def top(self, k: int) -> list:
        """The k best hits, each with its Evidence."""
        ids, fused, image_scores = (part[:k] for part in self.ranked)
        found = evidences(ids, image_scores, self.reports, self.space, self.reported(ids))
        return [
            Hit(int(i), round(float(f), 6), evidence)
            for i, f, evidence in zip(ids, fused, found, strict=True)
        ]
