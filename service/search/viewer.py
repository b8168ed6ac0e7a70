"""Results lead back to the PACS: a hit's DICOM UIDs and its link in a viewer (CONVIRT_VIEWER_URL).

Metadata names the UIDs in many spellings (a DICOM header's StudyInstanceUID, `convirt index`'s
study_uid, a manifest's "Study Instance UID"); they are matched without case, "_" or " ", as
grouping does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from .grouping import _plain

UID_FIELDS: dict[str, tuple[str, ...]] = {
    "study": ("study_instance_uid", "study_uid"),
    "series": ("series_instance_uid", "series_uid"),
    "instance": ("sop_instance_uid", "sop_uid", "instance_uid"),
}


def dicom_uids(meta: Mapping[str, Any] | None) -> dict[str, str]:
    """{"study", "series", "instance"}: those the metadata holds."""
    fields = {_plain(name): value for name, value in (meta or {}).items()}
    found = {}
    for kind, names in UID_FIELDS.items():
        for name in names:
            value = str(fields.get(_plain(name)) or "").strip()
            if value:
                found[kind] = value
                break
    return found


def viewer_url(template: str | None, uids: Mapping[str, str]) -> str | None:
    """The template with the UIDs filled in (URL-encoded); None when one it needs is missing."""
    if not template:
        return None
    try:
        return template.format_map({kind: quote(uid, safe="") for kind, uid in uids.items()})
    except KeyError:
        return None
