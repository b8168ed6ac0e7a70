"""The audit record of one request, filled in as it is served, and how its ids are written.

Why ids are packed: a grouped search may return 100 cards of up to 9 images each; written as a
JSON list that is up to ~20 KB a line (7 KB for a typical k=100 group_by=study answer), enough for
one reader within the rate limit to fill a disk in a day. Up to INLINE_IDS ids stay a plain list;
a larger answer keeps its first `max_ids` ids (in the order shown: cards with their group members)
packed as 8-byte integers in base64url, with the count and a SHA-256 of the whole list, so the
line stays near 1.5 KB whatever the answer.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

INLINE_IDS = 16  # up to this many result ids: written as a list, as before
DEFAULT_MAX_IDS = 100  # past INLINE_IDS: the first this many ids are kept (packed)
ID_LIMIT = 2**64


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AuditRecord:
    user: str
    name: str | None
    role: str | None
    client: str | None
    method: str
    endpoint: str
    time: str = field(default_factory=utc_now)
    status: int = 200
    query: str | None = None  # in memory only: written as a hash unless CONVIRT_AUDIT_QUERIES=text
    upload: bytes | None = None  # an uploaded image, in memory only: written as a hash
    images: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)


_current: ContextVar[AuditRecord | None] = ContextVar("convirt_audit_record", default=None)


def begin(record: AuditRecord) -> Any:
    """Make `record` the current request's (returns the token for end())."""
    return _current.set(record)


def end(token: Any) -> None:
    try:
        _current.reset(token)
    except ValueError:  # not the context it was set in
        _current.set(None)


def note_query(text: str | None) -> None:
    record = _current.get()
    if record is not None and text is not None:
        record.query = text


def note_upload(data: bytes) -> None:
    """An uploaded image: hashed when the record is written (in a worker thread, not here)."""
    record = _current.get()
    if record is not None:
        record.upload = data


def note_image(image_id: int | str | None) -> None:
    record = _current.get()
    if record is not None and image_id is not None and str(image_id) not in record.images:
        record.images.append(str(image_id))


def note_results(results: Iterable[Any]) -> None:
    """The ids of search results (service/search/cards.py Card), their groups' other members
    included."""
    record = _current.get()
    if record is None:
        return
    for result in results:
        record.results.append(str(result.id))
        if result.group is not None:
            record.results.extend(str(member.id) for member in result.group.more)


# -- result ids on the line ------------------------------------------------------------------------


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def packable(ids: list[str]) -> bool:
    return all(i.isdigit() and len(i) <= 20 and int(i) < ID_LIMIT for i in ids)


def result_fields(ids: list[str], max_ids: int = DEFAULT_MAX_IDS) -> dict[str, Any]:
    """The fields an answer's result ids are written as (see the module docstring)."""
    if len(ids) <= INLINE_IDS:
        return {"results": ids}
    kept = ids[:max_ids]
    fields: dict[str, Any] = {"results_count": len(ids), "results_sha256": ids_digest(ids)}
    if packable(kept):
        packed = b"".join(int(i).to_bytes(8, "big") for i in kept)
        fields["results_packed"] = base64.urlsafe_b64encode(packed).decode().rstrip("=")
    else:
        fields["results"] = kept
    return fields


def result_ids(entry: dict[str, Any]) -> list[str]:
    """The result ids an entry records (all of them, or the first ones kept of a large answer)."""
    packed = entry.get("results_packed")
    if isinstance(packed, str):
        data = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))
        return [str(int.from_bytes(data[i : i + 8], "big")) for i in range(0, len(data), 8)]
    return [str(i) for i in entry.get("results") or []]


def result_count(entry: dict[str, Any]) -> int:
    count = entry.get("results_count")
    return int(count) if isinstance(count, int) else len(result_ids(entry))
