"""The search core's answer as a response: its cards (service/search/cards.py) to SearchResult
items with URLs built from ids (never from paths), and a Found to a response's fields."""

from __future__ import annotations

import time
from typing import Any

from service.search.calibration import label
from service.search.cards import Card, CardGroup
from service.search.query import Found

from .responses import (
    CaseSummary,
    DicomUids,
    Evidence,
    Group,
    GroupMember,
    ImageMetadata,
    ScoreScale,
    SearchResult,
)


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def image_urls(root: str, image_id: int) -> dict[str, str]:
    base = f"{root}/v1/images/{image_id}"
    return {
        "image_url": base,
        "thumbnail_url": f"{base}/thumbnail",
        "similar_url": f"{base}/similar",
    }


def response_fields(found: Found, started: float, root: str) -> dict[str, Any]:
    """The fields every search response has; `root` prefixes its URLs (deps.url_root)."""
    results = [search_result(card, root) for card in found.results]
    scale = found.scale
    if scale is not None:  # what each score means (service/search/calibration.py)
        for result, card in zip(results, found.results, strict=True):
            result.match = label(card.score, scale)
    return {
        "results": results,
        "scale": ScoreScale.model_validate(scale, from_attributes=True) if scale else None,
        "took_ms": elapsed_ms(started),
        "index_version": found.index_version,
        "model_fingerprint": found.model_fingerprint,
        "timings": found.timings,
    }


def search_result(card: Card, root: str) -> SearchResult:
    evidence = card.evidence
    uids = card.dicom
    return SearchResult(
        id=str(card.id),
        score=card.score,
        # the response models read the attributes of their names off the card and its evidence
        evidence=Evidence.model_validate(evidence, from_attributes=True) if evidence else None,
        case=CaseSummary.model_validate(card.case, from_attributes=True) if card.case else None,
        metadata=ImageMetadata.model_validate(card, from_attributes=True),
        report=card.report,
        group=group(card.group, root) if card.group is not None else None,
        dicom=DicomUids(
            study_instance_uid=uids.get("study"),
            series_instance_uid=uids.get("series"),
            sop_instance_uid=uids.get("instance"),
        )
        if uids
        else None,
        viewer_url=card.viewer_url,
        **image_urls(root, card.id),
    )


def group(card_group: CardGroup, root: str) -> Group:
    more = [
        GroupMember(
            id=str(member.id),
            score=member.score,
            thumbnail_url=image_urls(root, member.id)["thumbnail_url"],
        )
        for member in card_group.more
    ]
    return Group(
        by=card_group.by,
        field=card_group.named_by,
        key=card_group.key,
        size=card_group.size,
        more=more,
    )
