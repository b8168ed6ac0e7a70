"""Index hits to cards: what a search answers, as plain data read from the store's rows.

A card is one image (the best of its study or patient, when grouped) with its metadata, report,
DICOM UIDs, viewer link, case summary (case.py) and, for a text query, why it ranked. It holds ids, never paths or URLs:
the routes make the URLs (service/api/results.py) and the response items of the JSON API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from index.read.hybrid import Evidence
from index.read.limits import MAX_GROUP_MEMBERS
from index.read.search import Hit

from .case import CaseSummary, case_summary
from .grouping import HitGroup
from .viewer import dicom_uids, viewer_url


@dataclass(frozen=True)
class GroupMember:
    id: int
    score: float


@dataclass(frozen=True)
class CardGroup:
    """The study or patient a card stands for: `named_by` is the field that named it."""

    by: str  # study or patient
    named_by: str
    key: str
    size: int  # its images among the matches found
    more: list[GroupMember]  # its other images, best first, at most MAX_GROUP_MEMBERS


@dataclass(frozen=True)
class Card:
    id: int
    score: float
    relpath: str
    width: int
    height: int
    size_bytes: int
    modality: str | None = None
    view: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)  # manifest columns, DICOM fields
    report: str | None = None
    group: CardGroup | None = None
    dicom: Mapping[str, str] = field(default_factory=dict)  # study, series, instance UIDs held
    viewer_url: str | None = None
    evidence: Evidence | None = None  # text queries ranked with the reports
    case: CaseSummary | None = None  # what a clinician reads first (case.py)


def describe(
    hit: Hit,
    row: Mapping[str, Any],
    group: CardGroup | None = None,
    viewer: str | None = None,
) -> Card:
    uids = dicom_uids(row.get("meta"))
    return Card(
        id=hit.id,
        score=hit.score,
        relpath=row["relpath"],
        width=row["width"],
        height=row["height"],
        size_bytes=row["size_bytes"],
        modality=row.get("modality"),
        view=row.get("view"),
        fields=row.get("meta") or {},
        report=row.get("report") or None,
        group=group,
        dicom=uids,
        viewer_url=viewer_url(viewer, uids),
        evidence=hit.evidence,
        case=case_summary(row),
    )


def describe_groups(
    groups: list[HitGroup],
    rows: Mapping[int, Mapping[str, Any]],
    group_by: str,
    viewer: str | None = None,
) -> list[Card]:
    """One card per group: its best image, the others listed under it; `viewer` is the
    CONVIRT_VIEWER_URL template."""
    return [
        describe(group.lead, rows[group.lead.id], group_of(group, group_by), viewer)
        for group in groups
    ]


def group_of(group: HitGroup, group_by: str) -> CardGroup | None:
    if group.key is None or group.named_by is None:
        return None
    more = [GroupMember(hit.id, hit.score) for hit in group.others[:MAX_GROUP_MEMBERS]]
    return CardGroup(group_by, group.named_by, group.key, 1 + len(group.others), more)
