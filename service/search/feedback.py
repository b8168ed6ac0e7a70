"""Refine by example: move the query vector toward liked results and away from disliked ones.

Rocchio's relevance feedback (Rocchio 1971; Manning, Raghavan & Schütze, ch. 9):

    q' = a·q + b·mean(liked) − c·mean(disliked),   then renormalised (by the search itself:
                                                    index/read/search.py normalises every query)

The defaults a = 1, b = 0.75, c = 0.15 are the textbook's: a liked example says more about what
is wanted than a disliked one says about what is not. Measured with a simulated user on the dev
splits in docs/results.md ("Refine by example").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Weights:
    query: float = 1.0
    liked: float = 0.75
    disliked: float = 0.15


def rocchio(
    query: np.ndarray | None,
    liked: np.ndarray,
    disliked: np.ndarray,
    weights: Weights = Weights(),
) -> np.ndarray:
    """The refined query (not normalised: the search does that, in one place); `liked` and
    `disliked` are N x d (N may be 0).

    With no query (refining an uploaded image's results, say) the liked examples lead alone.
    Raises ValueError when nothing is left to search with."""
    parts = []
    if query is not None:
        parts.append(weights.query * _unit(np.asarray(query, np.float32)))
    if len(liked):
        parts.append(weights.liked * _unit(np.asarray(liked, np.float32)).mean(axis=0))
    if len(disliked):
        parts.append(-weights.disliked * _unit(np.asarray(disliked, np.float32)).mean(axis=0))
    if not parts:
        raise ValueError("nothing to refine: give a query or at least one liked image")
    refined = np.sum(parts, axis=0)
    if float(np.linalg.norm(refined)) < 1e-6:
        raise ValueError("the liked and disliked images cancel out: like at least one more")
    return refined.astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
