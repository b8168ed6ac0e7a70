"""What a score means on the served index: strong, possible or weak match, per kind of query.

Scores of different kinds of query live on different scales (a text query's cosine to images
runs about 0.4-0.7 on the demo, an image query's 0.8-1.0, a hybrid text query's fused score
another range again), and they shift with the model and the archive. So each index version is
asked, once, what its own queries score: a sample of its indexed images (image queries, encoder
space) and of its report sentences (text queries: the sentence's vector in the joint space, and
its words for the hybrid and report rankings) is searched against the index, each query's own
image(s) left out, and the scores of its best match (top-1) and of its tenth (top-10) are read
(service/search/scales.py does the sampling, in the background).

In plain words:

- **strong**: at least as close as the best match that a typical case of this archive finds
  among the others (the median top-1 score of the sample). Half the sampled cases have a match
  this close, so it is what "a genuinely similar case" looks like here.
- **possible**: at least as close as the tenth match of a typical case (the median top-10
  score): among the ten closest a typical case has, so worth a look but not more.
- **weak**: below that: further than the tenth neighbour of a typical case.

`low` and `high` are the range such scores usually take: the 5th percentile of the tenth
scores and the 95th percentile of the best scores; the threshold input's hint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE = "image"  # an image (uploaded, indexed, a region), or an image refined: encoder space
TEXT_DENSE = "text_dense"  # text, mode=image (or refined text): cosine in the joint space
TEXT_HYBRID = "text_hybrid"  # text, mode=hybrid, fusion=weighted (the default)
TEXT_REPORT = "text_report"  # text, mode=report, fusion=weighted
TEXT_HYBRID_RRF = "text_hybrid_rrf"
TEXT_REPORT_RRF = "text_report_rrf"
KINDS = (TEXT_HYBRID, TEXT_DENSE, IMAGE, TEXT_REPORT, TEXT_HYBRID_RRF, TEXT_REPORT_RRF)
MATCHES = ("strong", "possible", "weak")
MIN_QUERIES = 5  # fewer sampled queries with ten matches say nothing of a scale


@dataclass(frozen=True)
class Scale:
    kind: str
    strong: float
    possible: float
    low: float
    high: float
    queries: int  # sampled queries it was read from


def text_kind(mode: str, fusion: str) -> str:
    """The kind of a text query that was ranked by `mode` (image, report, hybrid)."""
    if mode == "image":
        return TEXT_DENSE
    return f"text_{mode}" + ("_rrf" if fusion == "rrf" else "")


def scale_of(kind: str, best: np.ndarray, tenth: np.ndarray) -> Scale | None:
    """The scale of a kind from its sampled queries' top-1 and top-10 scores; None when too few
    queries had ten matches."""
    best, tenth = np.asarray(best, np.float64), np.asarray(tenth, np.float64)
    if len(best) < MIN_QUERIES or len(tenth) < MIN_QUERIES:
        return None
    strong = float(np.median(best))
    possible = min(float(np.median(tenth)), strong)
    low = min(float(np.percentile(tenth, 5)), possible)
    high = max(float(np.percentile(best, 95)), strong)
    return Scale(
        kind,
        round(strong, 4),
        round(possible, 4),
        round(low, 4),
        round(high, 4),
        len(best),
    )


def label(score: float, scale: Scale) -> str:
    """strong, possible or weak (see the module docstring)."""
    if score >= scale.strong:
        return "strong"
    if score >= scale.possible:
        return "possible"
    return "weak"
