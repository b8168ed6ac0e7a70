"""Split free-text reports into sentences and sample one, as ConVIRT's text transform t_u does.

Real report text is messy: "XXXX" de-identification, numbered impressions ("1. ... 2. ..."),
abbreviations ("e.g.", "approx."), decimals, empty sections and stray punctuation (". .").
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

# Periods that never end a sentence. Units ("cm.") are left out: reports often end sentences on them.
ABBREVIATIONS = (
    "e.g.", "i.e.", "approx.", "appr.", "vs.", "etc.", "cf.", "dr.", "mr.", "mrs.", "ms.", "prof.",
    "fig.", "figs.", "st.", "pt.", "pts.", "hx.", "dx.", "ca.", "resp.", "incl.", "et al.", "a.m.",
    "p.m.", "u.s.", "b.i.d.", "t.i.d.",
)  # fmt: skip
_PLACEHOLDER = "\u2024"  # one-dot leader: stands in for protected periods while splitting
_ABBREV_RE = re.compile(
    r"(?<![\w.])("
    + "|".join(re.escape(a) for a in sorted(set(ABBREVIATIONS), key=len, reverse=True))
    + r")",
    re.IGNORECASE,
)
_DECIMAL_RE = re.compile(r"(?<=\d)\.(?=\d)")
# "1." / "2)" starting a list item: at the start, or after whitespace or a sentence end.
_LIST_ITEM_RE = re.compile(r"(?:^|(?<=\s)|(?<=[.:;]))\(?\d{1,2}[.)][.,:]?(?=\s+[A-Za-z]|[A-Z])")
# A sentence ends at . ! ? before a word that does not start in lower case, or at a blank line.
_BOUNDARY_RE = re.compile(r"(?<=[.!?])\s+(?![a-z])|\n\s*\n|\n(?=\s*[A-Z0-9-•*])|\s*[•]\s*")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")
_DEID_RE = re.compile(r"\bX{2,}\b")

# Words that mark a sentence as describing what an image shows (used by the "imaging" filter).
IMAGING_WORDS = re.compile(
    r"\b(x-?ray|radiograph\w*|cxr|ct|mri?|scan\w*|imag\w+|film|view|opacit\w+|consolidat\w+|"
    r"infiltrat\w+|effusion\w*|pneumothora\w+|atelecta\w+|ground[- ]glass|ggo|nodul\w+|mass\w*|"
    r"lesion\w*|lung\w*|pulmonary|pleura\w*|lobe\w*|hil\w+|cardiomegal\w+|heart|mediastin\w+|"
    r"cardiac|silhouette|vascular\w*|interstitial|reticul\w+|airspace|air space|bilateral\w*|"
    r"diaphragm\w*|costophrenic|edema|oedema|fractur\w+|enhanc\w+|hypo\w+|hyper\w+|attenuat\w+|"
    r"signal|density|densit\w+|calcif\w+|thicken\w+|shows?|showed|demonstrat\w+|reveal\w+|"
    r"seen|visible|noted|evidence|findings?|impression|unremarkable|normal)\b",
    re.IGNORECASE,
)


def split_sentences(text: str) -> list[str]:
    """Split a report into clean sentences; drops numbering, empty bits and pure de-id tokens."""
    if not text or not text.strip():
        return []
    protected = _DECIMAL_RE.sub(_PLACEHOLDER, text)
    protected = _ABBREV_RE.sub(lambda m: m.group(0).replace(".", _PLACEHOLDER), protected)
    protected = _LIST_ITEM_RE.sub("\n\n", protected)
    sentences = []
    for piece in _BOUNDARY_RE.split(protected):
        sentence = _clean(piece.replace(_PLACEHOLDER, "."))
        if _is_informative(sentence):
            sentences.append(sentence)
    return sentences


def _clean(sentence: str) -> str:
    sentence = re.sub(r"\s+", " ", sentence).strip()
    sentence = re.sub(r"^[\s.,;:•*-]+", "", sentence)
    sentence = re.sub(r"(\s*[.;,])+$", ".", sentence)  # ". ." and ",." endings become one "."
    return sentence.strip()


def _is_informative(sentence: str) -> bool:
    """At least two real words once de-identification tokens are removed."""
    return len(_WORD_RE.findall(_DEID_RE.sub(" ", sentence))) >= 2


def is_imaging_sentence(sentence: str) -> bool:
    """Heuristic: does the sentence describe what an image shows (not history or lab values)?"""
    return IMAGING_WORDS.search(sentence) is not None


def report_sentences(text: str, sentence_filter: str = "none") -> list[str]:
    """Sentences a training step may sample from; falls back to all when the filter keeps none."""
    sentences = split_sentences(text)
    if sentence_filter == "imaging":
        kept = [s for s in sentences if is_imaging_sentence(s)]
        return kept or sentences
    if sentence_filter != "none":
        raise ValueError(f"unknown sentence filter {sentence_filter!r}: use 'none' or 'imaging'")
    return sentences


def sample_sentence(sentences: Sequence[str], rng: random.Random, fallback: str = "") -> str:
    """One sentence chosen uniformly (the paper's t_u); the fallback when there is none."""
    if not sentences:
        return fallback.strip()
    return sentences[rng.randrange(len(sentences))]


def sentence_spans(text: str) -> list[tuple[str, int | None, int | None]]:
    """split_sentences(text), each with where it stands in `text`: (sentence, start, end), so
    that text[start:end] is the sentence as written (its spaces and final punctuation as in the
    report). A sentence is looked for after the one before it; (sentence, None, None) where
    it cannot be found, which cleaning alone never causes."""
    spans: list[tuple[str, int | None, int | None]] = []
    position = 0
    for sentence in split_sentences(text):
        found = _written(sentence).search(text, position)
        if found is None:
            spans.append((sentence, None, None))
            continue
        spans.append((sentence, found.start(), found.end()))
        position = found.end()
    return spans


def _written(sentence: str) -> re.Pattern[str]:
    """A cleaned sentence as it may be written: any run of spaces between its words, and the
    final "." _clean made of ",", ";" or ". ." (or added to nothing)."""
    body = sentence[:-1] if sentence.endswith(".") else sentence
    words = [re.escape(word) for word in body.split()]
    return re.compile(r"\s+".join(words) + r"(?:\s*[.;,])*")
