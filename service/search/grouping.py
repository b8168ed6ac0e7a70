"""One card per study or patient: hits grouped by the first metadata field that names one.

Archives name a study differently: a DICOM StudyInstanceUID or accession number, MedPix's
case_id, a PubMed Central article for ROCO's figures. The first of these present in an image's
metadata is its group; an image with none is a group of its own, so grouping never hides one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from index.read.search import Hit

GROUP_FIELDS: dict[str, tuple[str, ...]] = {
    "study": (
        "study_instance_uid",
        "study_uid",
        "accession_number",
        "study_id",
        "study",
        "case_id",
        "pmc_article",
    ),
    "patient": ("patient_id", "patient"),
}


@dataclass
class HitGroup:
    lead: Hit  # the best-scoring image of the group
    named_by: str | None = None  # the metadata field; None: the image is a group of its own
    key: str | None = None
    others: list[Hit] = field(default_factory=list)


def group_key(row: Mapping[str, Any], group_by: str) -> tuple[str, str] | None:
    """(field, value) naming the row's study or patient, or None."""
    fields = {_plain(name): (name, value) for name, value in (row.get("meta") or {}).items()}
    for wanted in GROUP_FIELDS.get(group_by, ()):
        name, value = fields.get(_plain(wanted), (None, None))
        if name is not None and str(value).strip():
            return name, str(value).strip()
    return None


def group_hits(
    hits: list[Hit], rows: Mapping[int, Mapping[str, Any]], group_by: str
) -> list[HitGroup]:
    """Hits (best first) gathered into groups, in the order of each group's best hit."""
    if group_by == "none":
        return [HitGroup(hit) for hit in hits if hit.id in rows]
    groups: dict[tuple[str, str], HitGroup] = {}
    ordered: list[HitGroup] = []
    for hit in hits:
        row = rows.get(hit.id)
        if row is None:
            continue
        key = group_key(row, group_by)
        if key is None:
            ordered.append(HitGroup(hit))
        elif key in groups:
            groups[key].others.append(hit)
        else:
            groups[key] = HitGroup(hit, *key)
            ordered.append(groups[key])
    return ordered


def _plain(name: str) -> str:
    return name.lower().replace("_", "").replace(" ", "")


def fill_groups(
    groups: list[HitGroup],
    members: Mapping[tuple[str, str], list[int]],
    scores: Mapping[int, float],
    min_score: float | None = None,
) -> None:
    """Give each named group all its members (field, key) -> ids that have a score, best first
    after its lead: a card's "+N more" then counts the whole study, not the part a search
    happened to read."""
    for group in groups:
        if group.key is None or group.named_by is None:
            continue
        ids = members.get((group.named_by, group.key), [])
        others = [
            Hit(i, scores[i])
            for i in ids
            if i != group.lead.id and i in scores and (min_score is None or scores[i] >= min_score)
        ]
        group.others = sorted(others, key=lambda hit: (-hit.score, hit.id))
