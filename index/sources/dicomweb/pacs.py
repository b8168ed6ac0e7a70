"""Pacs: one DICOMweb server, what to take from it (since, modalities, a report table) and the
limits every request to it keeps (index/sources/dicomweb/http.py)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .http import DicomwebError, PacsHttp
from .listing import DEFAULT_MAX_LISTED, Instance

KIND = "dicomweb"
SCHEME = "dicomweb://"  # what its images are named with (index.sources.remote.PROTOCOLS)
DEFAULT_TIMEOUT_S = 30.0  # per read
DEFAULT_DEADLINE_S = 300.0  # per request, whole: a 256 MB instance at ~1 MB/s
DEFAULT_MAX_INSTANCE_BYTES = 256 << 20  # an instance body; decoding has its own budget
DEFAULT_THREADS = 4  # instances fetched at once
FEEDS = ("auto", "orthanc", "qido")
DEFAULT_MAX_REMOVAL = 0.5
REPORT_SKIP_PREFIX = "structured report:"  # skip reasons that are no fault to retry
NAME_PATTERN = re.compile(
    r"^dicomweb://(?P<where>.+)/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)"
    r"/instances/(?P<sop>[^/]+)$"
)


def setting(env: str, default: float, kind: type = float) -> float:
    """A PACS limit's default: the environment variable `env` when set (a positive number),
    else `default`; the --flags override both."""
    text = os.environ.get(env, "").strip()
    if not text:
        return kind(default)
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise DicomwebError(f"{env}={text!r}: expected a positive number")
    return value


@dataclass(frozen=True)
class Pacs:
    """A DICOMweb server (its base URL, e.g. http://pacs:8042/dicom-web) and the filters."""

    url: str
    since: str | None = None  # YYYYMMDD: studies of that date or later
    modalities: tuple[str, ...] = ()  # empty: every modality
    reports: Path | None = None  # a RIS report table (CSV) joined at ingest
    timeout: float = DEFAULT_TIMEOUT_S
    feed: str = "auto"  # how sync finds what is new: auto, orthanc or qido
    threads: int = DEFAULT_THREADS
    # a sync refuses to remove more than this fraction of the images it holds from this PACS (a
    # PACS answering an empty listing during maintenance must not empty the index)
    max_removal: float = DEFAULT_MAX_REMOVAL
    deadline_s: float = DEFAULT_DEADLINE_S  # a whole request, however slowly the PACS sends
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES  # one WADO body; more is a skip
    max_listed: int = DEFAULT_MAX_LISTED  # instances one listing may hold; more is an error
    retry_skipped: bool = False  # fetch again what the index remembers as skipped

    def __post_init__(self) -> None:
        url = self.url.rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DicomwebError(
                f"--dicomweb {self.url!r}: expected the DICOMweb base URL, "
                "e.g. http://pacs:8042/dicom-web"
            )
        if not (self.timeout > 0 and self.deadline_s > 0 and self.max_instance_bytes > 0):
            raise DicomwebError(
                "--pacs-timeout, --pacs-deadline and --max-instance-mb must be positive"
            )
        if self.max_listed < 1:
            raise DicomwebError("--max-listed must be at least 1")
        if self.feed not in FEEDS:
            raise DicomwebError(f"--feed {self.feed!r}: one of {', '.join(FEEDS)}")
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "since", parse_since(self.since))
        object.__setattr__(self, "modalities", parse_modalities(self.modalities))
        if self.reports is not None:
            object.__setattr__(self, "reports", Path(self.reports).absolute())

    @property
    def prefix(self) -> str:
        """What every name this server's instances are stored under starts with."""
        parts = urlsplit(self.url)
        return f"{SCHEME}{parts.netloc}{parts.path}"

    def name(self, study: str, series: str, sop: str) -> str:
        return f"{self.prefix}/studies/{study}/series/{series}/instances/{sop}"

    def instance_name(self, instance: Instance) -> str:
        return self.name(instance.study, instance.series, instance.sop)

    def study_prefix(self, study: str) -> str:
        return f"{self.prefix}/studies/{study}/"

    def filters(self) -> dict[str, Any]:
        """What version.json records, and a sync reuses unless told otherwise."""
        return {
            "since": self.since,
            "modalities": list(self.modalities),
            "reports": str(self.reports) if self.reports else None,
        }

    def with_recorded(self, recorded: dict[str, Any] | None) -> Pacs:
        """These settings, with the filters of an earlier ingest where none were given."""
        if not recorded:
            return self
        reports = self.reports or (Path(recorded["reports"]) if recorded.get("reports") else None)
        return replace(
            self,
            since=self.since or recorded.get("since"),
            modalities=self.modalities or tuple(recorded.get("modalities") or ()),
            reports=reports,
        )

    def client(self, retry: bool = True, deadline_s: float | None = None) -> PacsHttp:
        """A bounded HTTP client of this PACS (http.py); `retry`: a request that gets
        no answer (or 429, 502, 503, 504) is tried RETRY_ATTEMPTS times in all."""
        return PacsHttp(self, retry=retry, deadline_s=deadline_s)

    def remembered(self, seen: dict[str, str]) -> dict[str, str]:
        """Of what an index remembers as skipped ({name: reason}), what is not fetched
        again: all of it, unless --retry-skipped (then only the Structured Reports read)."""
        if not self.retry_skipped:
            return seen
        return {n: r for n, r in seen.items() if r.startswith(REPORT_SKIP_PREFIX)}


def parse_since(text: str | None) -> str | None:
    if text in (None, ""):
        return None
    digits = str(text).replace("-", "")
    try:
        datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        raise DicomwebError(f"--since {text!r}: expected a date, YYYY-MM-DD or YYYYMMDD") from None
    return digits


def parse_modalities(value: Iterable[str] | str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    found = []
    for item in items:
        for part in str(item).split(","):
            code = part.strip().upper()
            if code and not re.fullmatch(r"[A-Z0-9_]{1,16}", code):
                raise DicomwebError(f"--modality {part!r}: a DICOM modality code such as CT or DX")
            if code and code not in found:
                found.append(code)
    return tuple(found)
