"""Filters of `convirt audit` (who, when, which image, which endpoint, which query)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .record import result_ids


def parse_time(text: str) -> datetime:
    """An ISO date or date-time; without a zone, UTC."""
    when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filters:
    user: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    image: str | None = None
    endpoint: str | None = None
    query_hash: str | None = None  # of the --query text, with the log's salt
    query_text: str | None = None

    def keep(self, entry: dict[str, Any]) -> bool:
        if self.user is not None and self.user not in (
            entry.get("user"),
            entry.get("name"),
            str(entry.get("user", "")).partition(":")[2],
        ):
            return False
        if self.since is not None or self.until is not None:
            when = parse_time(str(entry.get("time")))
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when > self.until:
                return False
        if self.image is not None and self.image not in (
            list(entry.get("images") or []) + result_ids(entry)
        ):
            return False
        if self.endpoint is not None and self.endpoint not in str(entry.get("endpoint", "")):
            return False
        if self.query_hash is not None or self.query_text is not None:
            return (self.query_hash is not None and entry.get("query_hash") == self.query_hash) or (
                self.query_text is not None and entry.get("query_text") == self.query_text
            )
        return True
