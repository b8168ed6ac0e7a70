"""Orthanc's change feed (/changes), read within fixed bounds, and the sync cursor a version records.

Orthanc's feed (/changes) is read until Done, and stops with FeedProblem when its Last does not
advance, when it pages past the cap, or when it answers garbage: the caller (a sync) then warns
and finds what is new by a listing, so a broken feed neither loops for ever with the index lock
held nor stops the sync.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from .http import BadAnswer, DicomwebError, PacsHttp, network_errors, unreachable

log = logging.getLogger(__name__)

CHANGES_PAGE = 1000
FEED_PAGE_MAX_BYTES = 16 << 20
SMALL_JSON_MAX_BYTES = 1 << 20  # /system, /statistics, /instances/ID/study
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


class FeedProblem(DicomwebError):
    """Orthanc's change feed cannot be followed (stuck, endless or garbled): list instead."""


def orthanc_root(pacs) -> str | None:
    """The Orthanc REST root serving this DICOMweb URL (GET /system answers), or None."""
    if pacs.feed == "qido":
        return None
    parts = urlsplit(pacs.url)
    path = parts.path.rstrip("/")
    candidates = [path.rsplit("/", 1)[0], path] if path else [""]
    client = PacsHttp(pacs, retry=False, deadline_s=min(10.0, pacs.deadline_s))
    try:
        for candidate in candidates:
            root = f"{parts.scheme}://{parts.netloc}{candidate}"
            try:
                data = client.get_json(
                    f"{root}/system",
                    "asking whether it is Orthanc",
                    max_bytes=SMALL_JSON_MAX_BYTES,
                    missing_ok=True,
                )
            except (DicomwebError, *network_errors()):
                data = None
            if isinstance(data, dict) and "ApiVersion" in data and "Version" in data:
                return root
    finally:
        client.close()
    if pacs.feed == "orthanc":
        raise DicomwebError(
            f"--feed orthanc: no Orthanc REST API answers GET /system beside {pacs.url}"
        )
    return None


def _feed_json(pacs, client: PacsHttp, url: str, doing: str, missing_ok: bool = False) -> Any:
    try:
        return client.get_json(url, doing, max_bytes=FEED_PAGE_MAX_BYTES, missing_ok=missing_ok)
    except BadAnswer:
        raise
    except network_errors() as err:
        raise unreachable(pacs, doing, err) from err


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def orthanc_position(pacs, root: str) -> dict[str, Any]:
    """Where Orthanc's change feed is now, and how many instances it holds. The feed is read
    first: an instance stored in between is then seen twice (harmless), never missed."""
    client = PacsHttp(pacs)
    try:
        last = _feed_json(pacs, client, f"{root}/changes?last", "reading the Orthanc change feed")
        count = _feed_json(pacs, client, f"{root}/statistics", "reading the Orthanc statistics")
    finally:
        client.close()
    seq = _count(last.get("Last")) if isinstance(last, dict) else None
    instances = _count(count.get("CountInstances")) if isinstance(count, dict) else None
    if seq is None or instances is None:
        raise FeedProblem(
            f"the Orthanc at {root} answers GET /changes?last or /statistics without a "
            "non-negative Last / CountInstances"
        )
    return {"feed": "orthanc", "seq": seq, "instances": instances}


def cursor_now(pacs) -> dict[str, Any]:
    """The sync cursor to record for a listing made from now on."""
    return cursor_at(pacs, orthanc_root(pacs))


def cursor_at(pacs, root: str | None) -> dict[str, Any]:
    """cursor_now, given orthanc_root's answer (None: not Orthanc, the QIDO listing). A feed
    that answers garbage is warned about and the QIDO cursor recorded."""
    position: dict[str, Any] = {"feed": "qido"}
    if root:
        try:
            position = orthanc_position(pacs, root)
        except (FeedProblem, BadAnswer) as err:
            log.warning("%s; recording a QIDO cursor: syncs will list the PACS instead", err)
    return {**position, "at": datetime.now(UTC).isoformat(timespec="seconds")}


def orthanc_changes(pacs, root: str, since: int) -> tuple[set[str], int, int]:
    """(StudyInstanceUIDs of the instances stored since `since`, how many, the feed's last seq).
    FeedProblem when the feed is stuck (Done false, Last not advancing), endless or garbled."""
    new_ids: dict[str, None] = {}
    last = since
    pages = 0
    client = PacsHttp(pacs)
    try:
        while True:
            url = f"{root}/changes?since={last}&limit={CHANGES_PAGE}"
            doing = "reading the Orthanc change feed"
            try:
                page = _feed_json(pacs, client, url, doing)
            except BadAnswer as err:
                raise FeedProblem(str(err)) from None
            changes = page.get("Changes") if isinstance(page, dict) else None
            after = _count(page.get("Last")) if isinstance(page, dict) else None
            done = page.get("Done", True) if isinstance(page, dict) else None
            if not isinstance(changes, list) or after is None or not isinstance(done, bool):
                raise FeedProblem(
                    f"the Orthanc at {root} answered GET {url} with no Changes list, Last "
                    "number and Done flag"
                )
            for change in changes:
                if not isinstance(change, dict) or change.get("ChangeType") != "NewInstance":
                    continue
                orthanc_id = change.get("ID")
                if isinstance(orthanc_id, str) and ORTHANC_ID.match(orthanc_id):
                    new_ids[orthanc_id] = None
            pages += 1
            if done or not changes:
                last = max(last, after)
                break
            if after <= last:
                raise FeedProblem(
                    f"the Orthanc at {root} answers GET {url} with Done: false but Last stays "
                    f"at {after} (it must advance past {last}): the feed is stuck"
                )
            last = after
            if len(new_ids) > pacs.max_listed or pages * CHANGES_PAGE > 2 * pacs.max_listed:
                raise FeedProblem(
                    f"the Orthanc at {root} change feed goes on past {pages:,} pages "
                    f"({len(new_ids):,} new instances) after seq {since}"
                )
        studies = set()
        for orthanc_id in new_ids:
            url = f"{root}/instances/{orthanc_id}/study"
            try:
                study = _feed_json(pacs, client, url, "resolving new instances", True)
            except BadAnswer as err:
                raise FeedProblem(str(err)) from None
            tags = study.get("MainDicomTags") if isinstance(study, dict) else None
            uid = tags.get("StudyInstanceUID") if isinstance(tags, dict) else None
            if isinstance(uid, str) and uid:  # None: deleted since
                studies.add(uid)
    finally:
        client.close()
    return studies, len(new_ids), last
