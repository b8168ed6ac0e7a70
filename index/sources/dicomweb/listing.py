"""What a PACS holds: QIDO-RS listings, read within fixed bounds.

A listing is read page by page (QIDO_PAGE records a request, each page at most
QIDO_PAGE_MAX_BYTES) into a Listing: a SQLite file in a temporary folder, deduplicated by SOP
Instance UID, so listing a 10M-instance archive costs disk, not memory (the raw DICOM JSON of a
page is dropped as soon as it is read). A listing longer than Pacs.max_listed (default sized for
a 10M-instance PACS) is an error naming the query: an endless listing stops there.

Every record is parsed defensively: a record whose UIDs cannot be read is counted and left out
(Listing.unreadable), an attribute of the wrong shape reads as absent; an answer that is no JSON
list is an error naming the server and the request.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from convirt.imageio import MAX_DECODED_BYTES, MAX_PIXELS
from convirt.paths import cache_dir

from .http import BadAnswer, DicomwebError, PacsHttp, network_errors, unreachable

log = logging.getLogger(__name__)

SR_MODALITY = "SR"
QIDO_PAGE = 1000
QIDO_PAGE_MAX_BYTES = 64 << 20  # 1,000 records are ~1-5 MB of DICOM JSON
DEFAULT_MAX_LISTED = 20_000_000  # twice a 10M-instance PACS: more is an endless listing
# A DICOM UID: digit groups joined by dots, at most 64 characters (PS3.5 9.1).
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# QIDO attribute tags (as DICOM JSON keys) this module reads.
TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "Modality": "00080060",
    "StudyDate": "00080020",
    "AccessionNumber": "00080050",
    "Rows": "00280010",
    "Columns": "00280011",
    "SamplesPerPixel": "00280002",
    "BitsAllocated": "00280100",
}
QIDO_FIELDS = ["Modality", "StudyDate", "AccessionNumber", "Rows", "Columns"]
QIDO_FIELDS += ["SamplesPerPixel", "BitsAllocated"]
FIELDS = ("study", "series", "sop", "modality", "study_date", "accession")
FIELDS += ("rows", "columns", "samples", "bits")


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance as QIDO lists it."""

    study: str
    series: str
    sop: str
    modality: str = ""
    study_date: str = ""
    accession: str = ""
    rows: int = 0
    columns: int = 0
    samples: int = 1
    bits: int = 0

    @property
    def relpath(self) -> str:
        return f"{self.study}/{self.series}/{self.sop}.dcm"

    @property
    def is_report(self) -> bool:
        return self.modality == SR_MODALITY

    @property
    def file_name(self) -> str:
        """Its local copy's name (a hash: a UID never becomes a path)."""
        return hashlib.sha256(self.sop.encode()).hexdigest()[:32] + ".dcm"

    def bad_uid(self) -> str | None:
        for what, uid in (("study", self.study), ("series", self.series), ("SOP", self.sop)):
            if len(uid) > 64 or not UID_PATTERN.match(uid):
                return f"not a valid DICOM {what} instance UID: {uid[:80]!r} (not fetched)"
        return None

    def too_large(self) -> str | None:
        """Why its frame is refused before it is fetched (from the QIDO attributes), or None."""
        if not (self.rows and self.columns):
            return None
        pixels = self.rows * self.columns
        decoded = pixels * max(1, self.samples) * max(1, (self.bits + 7) // 8)
        if pixels > MAX_PIXELS or decoded > MAX_DECODED_BYTES:
            return (
                f"frame too large: {self.columns}x{self.rows} pixels, {decoded:,} bytes once "
                f"decoded, above the {MAX_DECODED_BYTES:,}-byte limit (not fetched)"
            )
        return None


def _value(record: dict, keyword: str) -> Any:
    """The first value of an attribute of a DICOM JSON record; None when absent or malformed."""
    element = record.get(TAGS[keyword])
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values:
        return None
    value = values[0]
    return value if isinstance(value, str | int | float) else None


def _instance(record: Any) -> Instance | None:
    """The instance a QIDO record describes, or None when its UIDs cannot be read."""
    if not isinstance(record, dict):
        return None
    uids = [_value(record, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if not all(isinstance(u, str) and u for u in uids):
        return None

    def number(keyword: str, default: int = 0) -> int:
        value = _value(record, keyword)
        try:
            return max(0, min(int(value), 1 << 31)) if value not in (None, "") else default
        except (TypeError, ValueError, OverflowError):
            return default

    return Instance(
        *uids,
        modality=str(_value(record, "Modality") or "").upper()[:16],
        study_date=str(_value(record, "StudyDate") or "")[:32],
        accession=str(_value(record, "AccessionNumber") or "")[:64],
        rows=number("Rows"),
        columns=number("Columns"),
        samples=number("SamplesPerPixel", 1),
        bits=number("BitsAllocated"),
    )


class Listing:
    """Instances listed by QIDO, deduplicated by SOP Instance UID, in a SQLite file of a
    temporary folder (removed by close). Iterates in relpath order (study, series, SOP)."""

    def __init__(self, pacs) -> None:
        self.pacs = pacs
        place = cache_dir() / "dicomweb-listings"
        place.mkdir(parents=True, exist_ok=True)
        self.folder = tempfile.mkdtemp(prefix="listing-", dir=place)
        self.conn = sqlite3.connect(f"{self.folder}/listing.sqlite", check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        columns = ", ".join(f"{f} {'INTEGER' if f in FIELDS[6:] else 'TEXT'}" for f in FIELDS)
        self.conn.execute(f"CREATE TABLE listed ({columns}, PRIMARY KEY (sop))")
        self.count = 0
        self.unreadable = 0  # records whose UIDs could not be read (left out)

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __len__(self) -> int:
        return self.count

    def add(self, instances: Iterable[Instance]) -> int:
        """Store what is new; how many were new."""
        before = self.conn.total_changes
        with self.conn:
            self.conn.executemany(
                f"INSERT OR IGNORE INTO listed VALUES ({', '.join('?' * len(FIELDS))})",
                [tuple(getattr(i, f) for f in FIELDS) for i in instances],
            )
        fresh = self.conn.total_changes - before
        self.count += fresh
        return fresh

    def _taken(self) -> tuple[str, list[str]]:
        """SQL for "the filters take it": a wanted modality, or a Structured Report."""
        wanted = list(self.pacs.modalities)
        if not wanted:
            return "1", []
        return f"modality IN ({', '.join('?' * (len(wanted) + 1))})", [*wanted, SR_MODALITY]

    def __iter__(self) -> Iterator[Instance]:
        where, params = self._taken()
        query = f"SELECT {', '.join(FIELDS)} FROM listed WHERE {where} ORDER BY study, series, sop"
        for row in self.conn.execute(query, params):
            yield Instance(*row)

    def __contains__(self, sop: object) -> bool:
        where, params = self._taken()
        query = f"SELECT 1 FROM listed WHERE sop = ? AND {where}"
        return self.conn.execute(query, (sop, *params)).fetchone() is not None

    def image_studies(self) -> set[str]:
        where, params = self._taken()
        query = f"SELECT DISTINCT study FROM listed WHERE modality != ? AND {where}"
        return {row[0] for row in self.conn.execute(query, (SR_MODALITY, *params))}


def search(pacs, client: PacsHttp, doing: str, listing: Listing, url: str, filters: dict) -> None:
    """Every record of one QIDO instance search into `listing`, page by page (a server that caps
    its pages is read to the end; one that ignores the offset is read once). Past
    pacs.max_listed instances in the listing: DicomwebError (an endless listing)."""
    offset = 0
    while True:
        params = [("includefield", f) for f in QIDO_FIELDS]
        params += [("limit", QIDO_PAGE), ("offset", offset), *filters.items()]
        try:
            page = client.get_json(url, doing, max_bytes=QIDO_PAGE_MAX_BYTES, params=params)
        except BadAnswer:
            raise
        except network_errors() as err:
            raise unreachable(pacs, doing, err) from err
        if not isinstance(page, list):
            raise client.bad(url, doing, f"a JSON {type(page).__name__}, not a list of records")
        instances = []
        for record in page:
            instance = _instance(record)
            if instance is None:
                listing.unreadable += 1
            else:
                instances.append(instance)
        offset += len(page)
        fresh = listing.add(instances)
        if len(listing) > pacs.max_listed:
            raise DicomwebError(
                f"the PACS at {pacs.url} lists more than {pacs.max_listed:,} instances while "
                f"{doing} (GET {url}, offset {offset:,}): a listing that does not end. Nothing "
                "was published. Narrow it (--since, --modality) or, for an archive that large, "
                "raise --max-listed"
            )
        if not fresh:
            return


def list_instances(pacs, client: PacsHttp, studies: Iterable[str] | None = None) -> Listing:
    """Every instance the filters take, and the Structured Reports of the studies they touch.

    studies: only these studies (one QIDO each); None: the whole archive (one QIDO per modality,
    StudyDate >= since). The caller closes the Listing."""
    listing = Listing(pacs)
    try:
        since = {"StudyDate": f"{pacs.since}-"} if pacs.since else {}
        if studies is not None:
            for study in sorted(set(studies)):
                url = f"{pacs.url}/studies/{quote(study, safe='')}/instances"
                search(pacs, client, f"listing study {study}", listing, url, since)
        else:
            wanted = [*pacs.modalities, SR_MODALITY] if pacs.modalities else [None]
            for modality in wanted:
                filters = {**since, **({"Modality": modality} if modality else {})}
                doing = f"listing instances ({modality or 'every modality'})"
                search(pacs, client, doing, listing, f"{pacs.url}/instances", filters)
    except BaseException:
        listing.close()
        raise
    if listing.unreadable:
        log.warning(
            "the PACS at %s listed %d records whose UIDs cannot be read (not DICOM JSON "
            "objects); they are left out",
            pacs.url,
            listing.unreadable,
        )
    return listing
