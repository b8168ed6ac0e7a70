"""Retrieval scores of similarity matrices (recall@k, precision@k), and what chance would score
on the same task.

`scores` is Q x N (higher = more similar), `relevant` a Q x N boolean matrix of correct answers.
"""

from __future__ import annotations

import math

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties broken by index)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Fraction of queries with at least one relevant item in their top k."""
    hits = np.take_along_axis(relevant, top_k(scores, k), axis=1).any(axis=1)
    return float(hits.mean()) if len(hits) else float("nan")


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Mean over queries of (relevant items in the top k) / k."""
    hits = np.take_along_axis(relevant, top_k(scores, k), axis=1)
    return float(hits.sum(axis=1).mean() / min(k, scores.shape[1])) if len(hits) else float("nan")


def random_recall_at_k(relevant: np.ndarray, k: int) -> float:
    """Expected recall@k of a random ranking: 1 - C(N-m, k) / C(N, k) per query."""
    n = relevant.shape[1]
    k = min(k, n)
    values = [1.0 - _comb_ratio(n - int(m), n, k) for m in relevant.sum(axis=1)]
    return float(np.mean(values)) if values else float("nan")


def random_precision_at_k(relevant: np.ndarray, k: int) -> float:
    """Expected precision@k of a random ranking: m / N per query."""
    return float((relevant.sum(axis=1) / relevant.shape[1]).mean()) if len(relevant) else math.nan


def _comb_ratio(a: int, n: int, k: int) -> float:
    """C(a, k) / C(n, k) without overflow."""
    if a < k:
        return 0.0
    return math.exp(
        math.lgamma(a + 1) - math.lgamma(a - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1)
    )


def exclude_self(scores: np.ndarray) -> np.ndarray:
    """Copy of a square similarity matrix with the diagonal pushed to the bottom of every ranking."""
    scores = scores.copy()
    np.fill_diagonal(scores, -np.inf)
    return scores
