"""Index hits to response items: metadata from the store, URLs built from ids (never from paths).

Also where an indexed file is looked up on disk: only the path the index recorded for an id.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from index.sources import is_remote
from index.store import Hit

from .errors import ApiError
from .grouping import HitGroup
from .schemas import DicomUids, Evidence, Group, GroupMember, ImageMetadata, SearchResult
from .viewer import dicom_uids, viewer_url

MAX_GROUP_MEMBERS = 8  # listed under a card; `size` still counts them all


def image_urls(root: str, image_id: int) -> dict[str, str]:
    base = f"{root}/v1/images/{image_id}"
    return {
        "image_url": base,
        "thumbnail_url": f"{base}/thumbnail",
        "similar_url": f"{base}/similar",
    }


def describe(
    hit: Hit,
    row: Mapping[str, Any],
    root: str,
    group: Group | None = None,
    viewer: str | None = None,
) -> SearchResult:
    metadata = ImageMetadata(
        relpath=row["relpath"],
        width=row["width"],
        height=row["height"],
        size_bytes=row["size_bytes"],
        modality=row.get("modality"),
        view=row.get("view"),
        fields=row.get("meta") or {},
    )
    uids = dicom_uids(row.get("meta"))
    evidence = hit.evidence
    return SearchResult(
        id=str(hit.id),
        score=hit.score,
        evidence=Evidence(
            image=evidence.image,
            sentence=evidence.sentence,
            sentence_score=evidence.sentence_score,
            terms=list(evidence.terms),
            lexical=evidence.lexical,
            has_report=evidence.has_report,
        )
        if evidence
        else None,
        metadata=metadata,
        report=row.get("report") or None,
        group=group,
        dicom=DicomUids(
            study_instance_uid=uids.get("study"),
            series_instance_uid=uids.get("series"),
            sop_instance_uid=uids.get("instance"),
        )
        if uids
        else None,
        viewer_url=viewer_url(viewer, uids),
        **image_urls(root, hit.id),
    )


def describe_groups(
    groups: list[HitGroup],
    rows: Mapping[int, Mapping[str, Any]],
    root: str,
    group_by: str,
    viewer: str | None = None,
) -> list[SearchResult]:
    """One response item per group: its best image, the others listed under it; `viewer` is
    the CONVIRT_VIEWER_URL template."""
    return [
        describe(group.lead, rows[group.lead.id], root, group_of(group, root, group_by), viewer)
        for group in groups
    ]


def group_of(group: HitGroup, root: str, group_by: str) -> Group | None:
    if group.key is None or group.named_by is None:
        return None
    more = [
        GroupMember(
            id=str(hit.id), score=hit.score, thumbnail_url=image_urls(root, hit.id)["thumbnail_url"]
        )
        for hit in group.others[:MAX_GROUP_MEMBERS]
    ]
    return Group(
        by=group_by, field=group.named_by, key=group.key, size=1 + len(group.others), more=more
    )


def indexed_file(row: Mapping[str, Any]) -> Path:
    """The recorded path, if it still holds a regular file of the recorded size. An image from a
    PACS (a dicomweb:// path) is fetched from it once, here in the calling thread, and served from
    a local copy. The service never calls this for a PACS image: it fetches through
    service.pacs.PacsFetcher (its own pool, a deadline, one fetch per image)."""
    if is_remote(row["path"]):
        from index.dicomweb import fetch_for_serving
        from index.errors import IndexStoreError

        try:
            return fetch_for_serving(dict(row))
        except IndexStoreError as err:
            raise ApiError(
                404,
                "image_file_unavailable",
                f"image {row['id']} is indexed from a PACS that cannot give it now: {err}",
            ) from None
    path = Path(row["path"])
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file() or stat.st_size != row["size_bytes"]:
        raise ApiError(
            404,
            "image_file_missing",
            f"image {row['id']} is indexed, but its file was moved or changed since; "
            "run `convirt index verify` and re-add it",
        )
    return path
