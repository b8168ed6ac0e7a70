"""What similar cases said: report sentences for an image, drawn from the archive's reports.

Retrieval-based report drafting (CXR-RePaiR, Endo et al. 2021): the joint space puts an image
near the sentences that describe images like it. For one image (an upload, or an indexed one):

    1. its nearest cases in the encoder space (the image itself and its own study left out);
    2. candidate sentences: those of the cases' reports, and the sentences nearest the image's
       joint vector;
    3. each scored by   RELEVANCE * cos(image, sentence)
                      + (1 - RELEVANCE) * similarity of the nearest case whose report holds it;
    4. chosen by maximal marginal relevance (Carbonell & Goldstein 1998): each next sentence
       maximises  MMR * score - (1 - MMR) * its largest cosine to those already chosen,
       so five ways of saying "no effusion" do not crowd out the rest;
    5. the draft: the findings the chosen sentences assert as present, once each, in order.

It is a suggestion from retrieved text, never a diagnosis: the service and the page say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sentences import SentenceSpace, dot

CASES = 5  # nearest cases whose reports are read
NEAREST_SENTENCES = 50  # sentences nearest the image read besides them
RELEVANCE = 0.5
MMR = 0.7
DISCLAIMER = (
    "A suggestion assembled from the reports of similar archived cases, not a diagnosis: "
    "check every sentence against the image."
)


@dataclass
class Suggested:
    sentence: int  # sentence id
    text: str
    score: float
    cases: list[int]  # the image ids of the similar cases whose reports hold it
    findings: list[tuple[str, str]]  # (finding, status) the sentence asserts


@dataclass
class Suggestion:
    sentences: list[Suggested]
    draft: list[str] = field(default_factory=list)  # present findings, once each
    cases: list[tuple[int, float]] = field(default_factory=list)  # nearest cases, similarity


def suggest(
    space: SentenceSpace, joint: np.ndarray, cases: list[tuple[int, float]], count: int = 5
) -> Suggestion:
    """Up to `count` sentences for an image whose joint vector is `joint`, given its nearest
    cases (image id, similarity)."""
    support: dict[int, tuple[float, list[int]]] = {}
    for image, similarity in cases:
        for sid in space.sentences_of(image).tolist():
            best, holders = support.get(sid, (-1.0, []))
            support[sid] = (max(best, similarity), [*holders, image])
    near, _ = space.nearest(joint, NEAREST_SENTENCES)
    candidates = sorted(set(support) | set(near.tolist()))
    if not candidates:
        return Suggestion([], cases=cases)
    vectors = np.asarray(space.vectors[candidates], np.float32)
    relevance = dot(vectors, joint)
    held = np.array([support.get(sid, (0.0, []))[0] for sid in candidates])
    scores = RELEVANCE * relevance + (1 - RELEVANCE) * held
    chosen: list[int] = []
    redundancy = np.full(len(candidates), -np.inf)
    while len(chosen) < min(count, len(candidates)):
        marginal = MMR * scores - (1 - MMR) * np.maximum(redundancy, 0.0)
        marginal[chosen] = -np.inf
        best = int(np.argmax(marginal))
        chosen.append(best)
        redundancy = np.maximum(redundancy, dot(vectors, vectors[best]))
    picked = []
    for i in chosen:
        sid = candidates[i]
        findings = space.findings_of(sid)
        picked.append(
            Suggested(
                sid, space.texts[sid], float(scores[i]), support.get(sid, (0, []))[1], findings
            )
        )
    draft = list(
        dict.fromkeys(name for s in picked for name, status in s.findings if status == "present")
    )
    return Suggestion(picked, draft, cases)
