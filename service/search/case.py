"""A card's case summary: what a clinician reads first, from a row's metadata, never its path.

    title      TITLE_FIELDS, the first with a real value (not a placeholder such as "todo"):
               the diagnosis, else the impression, the finding, the case's title, the study's
               description; else the report's first sentence (at most TITLE_LENGTH characters,
               cut at a word); else None. Never a file name, path or hash.
    age, sex   the row's age / PatientAge, sex / PatientSex (M/F spelt male/female)
    exam       "CT · Chest": the normalised modality's name and body part (index/fields.py)
    modality   the normalised modality (XR, CT, MR, US, NM, PT, XA, MG, other)
    body_part  the normalised body part
    date       YYYY-MM-DD from StudyDate (YYYYMMDD) or a date / study_date field
    source     the dataset (`dataset`, or the folder its manifest is in), "PACS" for a PACS
    licence    the row's licence / license text

Every field is a string or None: a summary says nothing rather than guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from convirt.sentences import split_sentences
from index.fields import MODALITY_NAMES, OTHER, dataset_of
from index.read.facets import is_placeholder

from .grouping import _plain

TITLE_FIELDS = (
    "diagnosis", "impression", "finding", "case_title", "title", "StudyDescription",
)  # fmt: skip
TITLE_LENGTH = 120
SEXES = {"m": "male", "f": "female", "o": "other", "male": "male", "female": "female"}
DATE_FIELDS = ("StudyDate", "study_date", "date", "acquired", "AcquisitionDate")
REMOTE_PREFIXES = ("dicomweb://", "http://", "https://")


@dataclass(frozen=True)
class CaseSummary:
    title: str | None = None
    age: str | None = None
    sex: str | None = None
    exam: str | None = None
    modality: str | None = None
    body_part: str | None = None
    date: str | None = None
    source: str | None = None
    licence: str | None = None


def case_summary(row: Mapping[str, Any]) -> CaseSummary:
    """The summary of one store row (IndexStore.get: columns, `meta` and `report`)."""
    meta = row.get("meta") or {}
    fields = _Fields(meta)
    modality = row.get("modality") or None
    body_part = fields.first("body_part")
    return CaseSummary(
        title=fields.first(*TITLE_FIELDS) or first_sentence(row.get("report") or ""),
        age=_age(fields.first("age", "PatientAge")),
        sex=SEXES.get((fields.first("sex", "PatientSex") or "").lower()),
        exam=exam_line(modality, body_part, fields.first("modality_original")),
        modality=modality,
        body_part=body_part,
        date=_date(fields.first(*DATE_FIELDS)),
        source=source_name(meta, row.get("source") or ""),
        licence=fields.first("licence", "license"),
    )


class _Fields:
    """A row's metadata read by field name without case, "_" or spaces; placeholders skipped."""

    def __init__(self, meta: Mapping[str, Any]):
        self.by_plain = {_plain(name): value for name, value in meta.items()}

    def first(self, *names: str) -> str | None:
        for name in names:
            value = self.by_plain.get(_plain(name))
            if value is not None and not is_placeholder(str(value)):
                return str(value).strip()
        return None


def first_sentence(report: str) -> str | None:
    sentences = split_sentences(report)
    if not sentences:
        return None
    text = sentences[0]
    if len(text) <= TITLE_LENGTH:
        return text
    return text[:TITLE_LENGTH].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def exam_line(modality: str | None, body_part: str | None, original: str | None) -> str | None:
    """ "CT · Chest"; an "other" modality by the archive's own words."""
    name = MODALITY_NAMES.get(modality or "")
    if modality == OTHER:
        name = original or "Other"
    parts = [p for p in (name, body_part.capitalize() if body_part else None) if p]
    return " · ".join(parts) or None


def source_name(meta: Mapping[str, Any], source: str) -> str | None:
    """The dataset or archive an image comes from, by name (a folder's name, never its path)."""
    if source.startswith(REMOTE_PREFIXES):
        return str(meta.get("dataset") or "PACS")
    return dataset_of(meta, source) or (PurePath(source).name if source else None)


def _age(text: str | None) -> str | None:
    """ "45", or DICOM's "045Y" as "45"; other units ("006M") kept as written."""
    if text is None:
        return None
    found = re.fullmatch(r"0*(\d+)\s*Y?", text.strip(), re.IGNORECASE)
    return found.group(1) if found else text


def _date(text: str | None) -> str | None:
    if text is None:
        return None
    found = re.match(r"(\d{4})-?(\d{2})-?(\d{2})", text.strip())
    return "-".join(found.groups()) if found else None
