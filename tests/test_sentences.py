import csv
import random
import re

import pytest

from convirt.sentences import (
    is_imaging_sentence,
    report_sentences,
    sample_sentence,
    split_sentences,
)


def test_numbered_impressions_become_separate_sentences():
    text = (
        "1. No acute cardiopulmonary process. 2. Stable left basilar scarring. 3) Old rib fracture."
    )
    assert split_sentences(text) == [
        "No acute cardiopulmonary process.",
        "Stable left basilar scarring.",
        "Old rib fracture.",
    ]


def test_abbreviations_and_decimals_do_not_split():
    text = "Nodule e.g. in the right apex measures approx. 1.5 cm. No effusion."
    assert split_sentences(text) == [
        "Nodule e.g. in the right apex measures approx. 1.5 cm.",
        "No effusion.",
    ]


def test_deidentification_and_empty_sections_are_dropped():
    text = "XXXX XXXX. . Heart size normal. XXXX. \n\nIMPRESSION:\n\nNo acute disease. ."
    assert split_sentences(text) == ["Heart size normal.", "No acute disease."]
    assert split_sentences("") == [] and split_sentences("   \n ") == []


def test_sample_sentence_falls_back_to_text_when_no_sentence():
    rng = random.Random(0)
    assert sample_sentence([], rng, fallback=" XXXX ") == "XXXX"
    assert sample_sentence(["a b."], rng) == "a b."


@pytest.fixture(scope="module")
def iu_reports(datasets):
    with open(datasets / "iu-reports" / "reports.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_real_iu_reports_split_cleanly(iu_reports):
    n_sentences = 0
    for row in iu_reports:
        text = f"{row['findings']}\n\n{row['impression']}"
        sentences = split_sentences(text)
        n_sentences += len(sentences)
        for s in sentences:
            assert s == s.strip() and "  " not in s
            assert not s.startswith((".", ",")) and not re.match(r"\d{1,2}[.)]\s", s), s
            assert s.replace("XXXX", "").strip(" .,") != "", s
    # IU reports average several sentences each
    assert 3 < n_sentences / len(iu_reports) < 10


def test_sampling_real_reports_is_uniform_and_seeded(iu_reports):
    text = next(r["findings"] for r in iu_reports if len(split_sentences(r["findings"])) >= 4)
    sentences = split_sentences(text)
    rng = random.Random(42)
    counts = {s: 0 for s in sentences}
    for _ in range(4000):
        counts[sample_sentence(sentences, rng)] += 1
    expected = 4000 / len(sentences)
    assert all(abs(c - expected) < 0.25 * expected for c in counts.values())
    a = [sample_sentence(sentences, random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same sentence


def test_imaging_filter_keeps_findings_drops_history(datasets):
    assert is_imaging_sentence("Chest radiograph showed bilateral ground-glass opacities.")
    assert not is_imaging_sentence("He had flown to Hanoi from Wuhan on January 17.")
    narrative = (
        "He had flown to Hanoi from Wuhan. Chest radiograph showed an infiltrate in the left lung."
    )
    assert report_sentences(narrative, "imaging") == [
        "Chest radiograph showed an infiltrate in the left lung."
    ]
    history_only = "He had flown to Hanoi from Wuhan. His wife was well."
    assert report_sentences(history_only, "imaging") == split_sentences(history_only)
    with pytest.raises(ValueError, match="unknown sentence filter"):
        report_sentences("a b.", "everything")
