"""The text `convirt pretrain-text` learns from: the train-split report sentences of the
manifests (and the iu-reports), with every sentence of another split left out, and the held-out
slice its MLM loss is scored on."""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from convirt.manifest import ManifestError, iter_manifest_rows
from convirt.sentences import report_sentences

IU_REPORT_FIELDS = ("findings", "impression")  # the report text; indication is history, mesh labels
MAX_WORDS = 40  # longer sentences become chunks of this many words (about 55 wordpieces)
HELDOUT_FRACTION = 0.05


def report_corpus(
    manifests: list[Path],
    split: str = "train",
    iu_reports: Path | None = None,
    max_words: int = MAX_WORDS,
) -> list[str]:
    """Distinct sentences (or chunks of at most max_words words) to pretrain on, in a fixed order.

    From each manifest: the texts of `split` rows only. A text that also appears in another split
    is dropped, and so is any sentence that occurs in another split's text: the tower must never
    have seen dev or test wording. The iu-reports have no split (no images, not used by ConVIRT's
    manifests), so all of them are added, minus those held-out sentences too.
    """
    texts: list[str] = []
    held_out_texts: set[str] = set()
    for manifest in manifests:
        mine, others = _manifest_texts(Path(manifest), split)
        texts += mine
        held_out_texts |= others
    if iu_reports is not None:
        texts += _iu_report_texts(Path(iu_reports))
    forbidden = {
        piece
        for text in held_out_texts
        for sentence in report_sentences(text)
        for piece in (sentence, *_chunks(sentence, max_words))
    }
    corpus = _unique(
        chunk
        for text in texts
        if text not in held_out_texts
        for sentence in report_sentences(text)
        if sentence not in forbidden
        for chunk in _chunks(sentence, max_words)
    )
    return [c for c in corpus if c not in forbidden]


def _manifest_texts(manifest: Path, split: str) -> tuple[list[str], set[str]]:
    """(distinct texts of `split`, every text of the other splits) of one manifest."""
    rows = iter_manifest_rows(manifest)
    first = next(rows, None)
    if first is None:
        raise ManifestError(f"{manifest} has no rows")
    for column in ("text", "split"):
        if column not in first:
            raise ManifestError(
                f"{manifest} has no {column!r} column; its columns are: {', '.join(first)}"
            )
    mine: list[str] = []
    others: set[str] = set()
    for row in [first, *rows]:
        text = row["text"].strip()
        if text and row["split"] == split:
            mine.append(text)
        elif text:
            others.add(text)
    return _unique(mine), others


def _iu_report_texts(path: Path) -> list[str]:
    """The findings and impression of every iu-reports report, as separate texts."""
    if not path.is_file():
        raise ManifestError(f"iu-reports file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in IU_REPORT_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path} has no {missing[0]!r} column (not an iu-reports file?)")
        return [
            row[c].strip() for row in reader for c in IU_REPORT_FIELDS if (row[c] or "").strip()
        ]


def _chunks(sentence: str, max_words: int) -> Iterator[str]:
    """The sentence itself, or consecutive pieces of max_words words when it is longer."""
    words = sentence.split()
    for start in range(0, len(words), max_words):
        yield " ".join(words[start : start + max_words])


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def split_heldout(corpus: list[str], seed: int, limit: int = 256) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded 5% slice (at most `limit` sentences) kept out of training."""
    if len(corpus) < 2:
        raise ValueError(
            f"the text corpus has {len(corpus)} sentence(s); pretraining needs at least 2 "
            "(check the manifests' text and split columns)"
        )
    count = min(limit, max(1, round(len(corpus) * HELDOUT_FRACTION)))
    chosen = set(random.Random(seed).sample(range(len(corpus)), count))
    train = [s for i, s in enumerate(corpus) if i not in chosen]
    heldout = [s for i, s in enumerate(corpus) if i in chosen]
    return train, heldout
