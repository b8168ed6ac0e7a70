"""A PACS as an index source over DICOMweb: QIDO-RS finds the instances, WADO-RS fetches them.

    pacs = Pacs("http://pacs:8042/dicom-web", since="20240101", modalities=("CR", "DX"),
                reports=Path("ris.csv"))
    builder.build(root, bundle, list_source(pacs), options)      # convirt index build --dicomweb
    sync(root, bundle, pacs, options)                             # convirt index sync --dicomweb

What an instance becomes:
- an image (it has pixel data the DICOM rules of convirt.imageio decode): stored under the name
  dicomweb://HOST[:PORT]/PREFIX/studies/S/series/R/instances/I, with StudyInstanceUID,
  SeriesInstanceUID, SOPInstanceUID, PatientID, Modality, ViewPosition, BodyPartExamined,
  StudyDate (and AccessionNumber) from its header in the metadata, and its study's report;
- a Structured Report (Modality SR): its TextValue items, joined, are the report of its study's
  images (a row of the --reports table, from the RIS, wins over it);
- anything else (no pixel data, a transfer syntax nothing here decodes, a frame too large) is
  listed with the reason in build_report.json's skipped list, never fetched twice.
What was seen but not indexed is kept in the version's meta.sqlite (table not_indexed), so a sync
does not fetch it again.

Instances are downloaded into the write's staging area (ROOT/staging/FINGERPRINT/dicomweb/) and
embedded from there by the same job as a folder build; the copies go when the version is
published. A PACS that stops answering mid-way stops the write: nothing is published, and the same
command run again fetches only what it lacks and embeds only what was not staged.

`sync` brings an index up to date with the PACS in one new version: what is new is found by
Orthanc's /changes feed when the server is Orthanc (GET /system answers), else by listing the
instances by QIDO (StudyDate >= --since, the modalities); what was deleted is found by listing
(on Orthanc only when its instance count says something went). The feed position is stored in
version.json ("dicomweb": {URL: cursor}), published atomically with the data it describes. Nothing
new: nothing is published.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from convirt.imageio import MAX_DECODED_BYTES, MAX_PIXELS
from convirt.manifest import ManifestItem, Skip
from convirt.paths import cache_dir

from . import metadata
from .errors import check_fingerprint
from .sources import REMOTE_SCHEME, Source, SourceError, shard_of
from .version import Summary, writing

log = logging.getLogger(__name__)

KIND = "dicomweb"
SCHEME = REMOTE_SCHEME
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_THREADS = 4  # instances fetched at once
SERVE_TIMEOUT_S = 10.0
SR_MODALITY = "SR"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the Structured Report storage SOP classes
FEEDS = ("auto", "orthanc", "qido")
CHANGES_PAGE = 1000
QIDO_PAGE = 1000
RETRY_ATTEMPTS = 3
DEFAULT_MAX_REMOVAL = 0.5
TOKEN_ENV, USER_ENV, PASSWORD_ENV = (
    "CONVIRT_DICOMWEB_TOKEN",
    "CONVIRT_DICOMWEB_USER",
    "CONVIRT_DICOMWEB_PASSWORD",
)
# A DICOM UID: digit groups joined by dots, at most 64 characters (PS3.5 9.1).
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Header fields stored in every image's metadata (their DICOM keywords).
META_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PatientID",
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "StudyDate",
    "AccessionNumber",
)
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
NAME_PATTERN = re.compile(
    r"^dicomweb://(?P<where>.+)/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)"
    r"/instances/(?P<sop>[^/]+)$"
)
REPORT_KEY_COLUMNS = {
    "study": ("studyinstanceuid", "studyuid", "study"),
    "accession": ("accessionnumber", "accession"),
}
REPORT_TEXT_COLUMNS = ("report", "text", "reporttext")
UNKNOWN_KEYS_LISTED = 50


class DicomwebError(SourceError):
    """The PACS cannot be used as asked (unreachable, refusing, a bad setting); the message says
    what to do. Nothing was published."""


# -- where: one DICOMweb server and what to take from it ------------------------------------------


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

    def __post_init__(self) -> None:
        url = self.url.rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DicomwebError(
                f"--dicomweb {self.url!r}: expected the DICOMweb base URL, "
                "e.g. http://pacs:8042/dicom-web"
            )
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

    def client(self, retry: bool = True):
        """A DICOMweb client; `retry`: a failed request (no answer, 429, 503, 504) is tried
        RETRY_ATTEMPTS times in all, after 1 s, then 2 s."""
        from dicomweb_client.api import DICOMwebClient

        connect = min(10.0, self.timeout)
        client = DICOMwebClient(self.url, session=session(), timeout=(connect, self.timeout))
        client.set_http_retry_params(
            retry=retry, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=500
        )
        return client


def session():
    """An HTTP session with the PACS credentials of the environment: CONVIRT_DICOMWEB_TOKEN (a
    bearer token), else CONVIRT_DICOMWEB_USER and CONVIRT_DICOMWEB_PASSWORD (basic auth)."""
    import requests

    http = requests.Session()
    token = os.environ.get(TOKEN_ENV)
    user = os.environ.get(USER_ENV)
    if token:
        http.headers["Authorization"] = f"Bearer {token}"
    elif user:
        http.auth = (user, os.environ.get(PASSWORD_ENV, ""))
    return http


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


# -- talking to the server -------------------------------------------------------------------------


@dataclass(frozen=True)
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
    values = record.get(TAGS[keyword], {}).get("Value") or [None]
    return values[0]


def _instance(record: dict) -> Instance | None:
    uids = [_value(record, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if not all(uids):
        return None

    def number(keyword: str, default: int = 0) -> int:
        try:
            return int(_value(record, keyword) or default)
        except (TypeError, ValueError):
            return default

    return Instance(
        *(str(u) for u in uids),
        modality=str(_value(record, "Modality") or "").upper(),
        study_date=str(_value(record, "StudyDate") or ""),
        accession=str(_value(record, "AccessionNumber") or ""),
        rows=number("Rows"),
        columns=number("Columns"),
        samples=number("SamplesPerPixel", 1),
        bits=number("BitsAllocated"),
    )


def unreachable(pacs: Pacs, doing: str, err: BaseException, writing: bool = True) -> DicomwebError:
    """The error for a PACS that did not answer: what failed, and (writing an index) that nothing
    was published and a rerun resumes."""
    import requests

    if isinstance(err, requests.Timeout):
        what = f"did not answer within {pacs.timeout:g} s"
    elif isinstance(err, requests.ConnectionError):
        what = "cannot be reached"
    elif isinstance(err, requests.HTTPError) and err.response is not None:
        what = f"answered HTTP {err.response.status_code} {err.response.reason}"
    else:
        what = f"failed ({type(err).__name__}: {err})"
    if not writing:
        return DicomwebError(f"the PACS at {pacs.url} {what} while {doing}")
    return DicomwebError(
        f"the PACS at {pacs.url} {what} while {doing}. Nothing was published: the current "
        "version keeps serving. Check the URL and the server (`curl "
        f"{pacs.url}/studies?limit=1`), then run the same command again: it resumes"
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    import requests

    return (requests.RequestException, OSError)


def search(pacs: Pacs, client, doing: str, **kwargs) -> list[dict]:
    """Every record of a QIDO instance search, page by page (a server that caps its pages is
    read to the end; one that ignores the offset is read once)."""
    records: list[dict] = []
    seen: set[str] = set()
    while True:
        try:
            page = client.search_for_instances(
                fields=QIDO_FIELDS, limit=QIDO_PAGE, offset=len(records), **kwargs
            )
        except _network_errors() as err:
            raise unreachable(pacs, doing, err) from err
        fresh = [r for r in page if str(_value(r, "SOPInstanceUID")) not in seen]
        if not fresh:
            return records
        records += fresh
        seen.update(str(_value(r, "SOPInstanceUID")) for r in fresh)


def list_instances(pacs: Pacs, client, studies: Iterable[str] | None = None) -> list[Instance]:
    """Every instance the filters take, and the Structured Reports of the studies they touch.

    studies: only these studies (one QIDO each); None: the whole archive (one QIDO per modality,
    StudyDate >= since)."""
    records: list[dict] = []
    if studies is not None:
        for study in sorted(set(studies)):
            filters = {"StudyDate": f"{pacs.since}-"} if pacs.since else {}
            records += search(
                pacs,
                client,
                f"listing study {study}",
                study_instance_uid=study,
                search_filters=filters,
            )
    else:
        wanted = [*pacs.modalities, SR_MODALITY] if pacs.modalities else [None]
        for modality in wanted:
            filters = {"StudyDate": f"{pacs.since}-"} if pacs.since else {}
            if modality:
                filters["Modality"] = modality
            records += search(
                pacs,
                client,
                f"listing instances ({modality or 'every modality'})",
                search_filters=filters,
            )
    found: dict[str, Instance] = {}
    for record in records:
        instance = _instance(record)
        if instance is None or instance.sop in found:
            continue
        if pacs.modalities and not instance.is_report and instance.modality not in pacs.modalities:
            continue
        found[instance.sop] = instance
    return sorted(found.values(), key=lambda i: i.relpath)


def orthanc_root(pacs: Pacs) -> str | None:
    """The Orthanc REST root serving this DICOMweb URL (GET /system answers), or None."""
    import requests

    if pacs.feed == "qido":
        return None
    parts = urlsplit(pacs.url)
    path = parts.path.rstrip("/")
    candidates = [path.rsplit("/", 1)[0], path] if path else [""]
    for candidate in candidates:
        root = f"{parts.scheme}://{parts.netloc}{candidate}"
        try:
            with session() as http:
                answer = http.get(f"{root}/system", timeout=min(10.0, pacs.timeout))
            data = answer.json() if answer.ok else None
        except (requests.RequestException, ValueError):
            data = None
        if isinstance(data, dict) and "ApiVersion" in data and "Version" in data:
            return root
    if pacs.feed == "orthanc":
        raise DicomwebError(
            f"--feed orthanc: no Orthanc REST API answers GET /system beside {pacs.url}"
        )
    return None


def _get_json(pacs: Pacs, url: str, doing: str, missing_ok: bool = False, http=None) -> Any:
    """GET url as JSON, in `http` (a session() to reuse across many calls) or a session of its
    own; an unreachable PACS is a DicomwebError naming `doing`."""
    import requests

    try:
        with closing(session()) if http is None else nullcontext(http) as client:
            answer = client.get(url, timeout=(min(10.0, pacs.timeout), pacs.timeout))
        if missing_ok and answer.status_code == 404:
            return None
        answer.raise_for_status()
        return answer.json()
    except (requests.RequestException, ValueError) as err:
        raise unreachable(pacs, doing, err) from err


def orthanc_position(pacs: Pacs, root: str) -> dict[str, Any]:
    """Where Orthanc's change feed is now, and how many instances it holds. The feed is read
    first: an instance stored in between is then seen twice (harmless), never missed."""
    last = _get_json(pacs, f"{root}/changes?last", "reading the Orthanc change feed")
    count = _get_json(pacs, f"{root}/statistics", "reading the Orthanc statistics")
    return {
        "feed": "orthanc",
        "seq": int(last.get("Last", 0)),
        "instances": count["CountInstances"],
    }


def cursor_now(pacs: Pacs) -> dict[str, Any]:
    """The sync cursor to record for a listing made from now on."""
    return cursor_at(pacs, orthanc_root(pacs))


def cursor_at(pacs: Pacs, root: str | None) -> dict[str, Any]:
    """cursor_now, given orthanc_root's answer (None: not Orthanc, the QIDO listing)."""
    position = orthanc_position(pacs, root) if root else {"feed": "qido"}
    return {**position, "at": datetime.now(UTC).isoformat(timespec="seconds")}


def orthanc_changes(pacs: Pacs, root: str, since: int) -> tuple[set[str], int, int]:
    """(StudyInstanceUIDs of the instances stored since `since`, how many, the feed's last seq)."""
    new_ids: list[str] = []
    last = since
    while True:
        page = _get_json(
            pacs,
            f"{root}/changes?since={last}&limit={CHANGES_PAGE}",
            "reading the Orthanc change feed",
        )
        new_ids += [c["ID"] for c in page["Changes"] if c.get("ChangeType") == "NewInstance"]
        last = max(last, int(page.get("Last", last)))
        if page.get("Done", True) or not page["Changes"]:
            break
    studies = set()
    with session() as http:  # one connection for what may be thousands of look-ups
        for orthanc_id in dict.fromkeys(new_ids):
            url = f"{root}/instances/{orthanc_id}/study"
            study = _get_json(pacs, url, "resolving new instances", True, http)
            if study:  # None: deleted since
                uid = study.get("MainDicomTags", {}).get("StudyInstanceUID")
                if uid:
                    studies.add(uid)
    return studies, len(new_ids), last


def retrieve(client, instance: Instance) -> bytes:
    """The instance as a DICOM Part-10 file, in the transfer syntax the PACS holds it in."""
    import pydicom

    dataset = client.retrieve_instance(
        instance.study, instance.series, instance.sop, media_types=(("application/dicom", "*"),)
    )
    out = io.BytesIO()
    pydicom.dcmwrite(out, dataset)
    return out.getvalue()


# -- reports ---------------------------------------------------------------------------------------


@dataclass
class ReportTable:
    """A RIS report table: report text by StudyInstanceUID and/or AccessionNumber."""

    path: Path
    by_study: dict[str, str] = field(default_factory=dict)
    by_accession: dict[str, str] = field(default_factory=dict)
    rows: int = 0

    @classmethod
    def read(cls, path: Path) -> ReportTable:
        if not path.is_file():
            raise DicomwebError(f"--reports {path}: no such file")
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            columns = {_plain(name): name for name in reader.fieldnames or []}
            keys = {
                kind: next((columns[c] for c in names if c in columns), None)
                for kind, names in REPORT_KEY_COLUMNS.items()
            }
            text = next((columns[c] for c in REPORT_TEXT_COLUMNS if c in columns), None)
            if text is None or not any(keys.values()):
                raise DicomwebError(
                    f"--reports {path}: needs a StudyInstanceUID or AccessionNumber column and "
                    f"a report (or text) column; it has {', '.join(reader.fieldnames or []) or 'none'}"
                )
            table = cls(path)
            for row in reader:
                report = " ".join((row.get(text) or "").split())
                if not report:
                    continue
                table.rows += 1
                if keys["study"] and (row.get(keys["study"]) or "").strip():
                    table.by_study[row[keys["study"]].strip()] = report
                elif keys["accession"] and (row.get(keys["accession"]) or "").strip():
                    table.by_accession[row[keys["accession"]].strip()] = report
        return table

    def report(self, study: str, accession: str) -> str:
        return self.by_study.get(study) or (self.by_accession.get(accession) if accession else "")

    def unknown(self, studies: set[str], accessions: set[str]) -> list[str]:
        """Keys of rows that name no study the PACS listed or the index holds."""
        missing = [uid for uid in self.by_study if uid not in studies]
        missing += [number for number in self.by_accession if number not in accessions]
        return sorted(missing)


def _plain(name: str) -> str:
    return name.lower().replace("_", "").replace(" ", "")


def sr_text(dataset) -> str:
    """The TextValue content items of a Structured Report, in document order, joined."""
    texts: list[str] = []

    def walk(items) -> None:
        for item in items:
            value = item.get("TextValue")
            if value:
                texts.append(" ".join(str(value).split()))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(dataset.get("ContentSequence") or [])
    return " ".join(t for t in texts if t)


# -- the source --------------------------------------------------------------------------------------


@dataclass
class Fetched:
    """What one downloaded instance turned out to be."""

    instance: Instance
    path: Path | None
    meta: dict[str, str] = field(default_factory=dict)
    report: str | None = None  # a Structured Report's text
    skip: str | None = None  # why it is not indexed


@dataclass
class DicomwebSource(Source):
    """Instances of a PACS, listed; `fetch` downloads them and makes them items."""

    pacs: Pacs | None = None
    instances: list[Instance] = field(default_factory=list)
    cursor: dict[str, Any] = field(default_factory=dict)
    indexed_studies: set[str] = field(default_factory=set)  # already in the index (sync)
    indexed_accessions: set[str] = field(default_factory=set)
    indexed_reports: dict[str, str] = field(default_factory=dict)  # study -> its report there
    not_fetched: int = 0  # instances left out because the index holds them already
    record: bool = True  # record the cursor and filters in version.json (build, sync; not add)
    # filled by fetch:
    fetched: list[Fetched] = field(default_factory=list)
    downloads: dict[str, int] = field(default_factory=dict)
    sr_texts: dict[str, list[str]] = field(default_factory=dict)  # study -> its SR texts
    table: ReportTable | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": KIND, "location": self.pacs.url, **self.pacs.filters()}

    def shard(self, index: int, count: int) -> DicomwebSource:
        """The instances of the studies whose UID hashes to shard `index` (a study, its images
        and its report, stays in one shard)."""
        mine = [i for i in self.instances if shard_of(i.study, count) == index]
        return replace(self, instances=mine)

    def fetch(self, directory: Path, progress: bool = True) -> DicomwebSource:
        folder = Path(directory) / KIND / hashlib.sha256(self.pacs.url.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        fetched, counts = download(self.pacs, self.instances, folder, progress)
        source = replace(self, fetched=fetched, downloads=counts)
        source._make_items()
        return source

    def _make_items(self) -> None:
        self.table = table = ReportTable.read(self.pacs.reports) if self.pacs.reports else None
        self.sr_texts = sr = {}
        for done in self.fetched:
            if done.report:
                sr.setdefault(done.instance.study, []).append(done.report)
        self.items, self.missing, self.names = [], [], {}
        for done in self.fetched:
            instance = done.instance
            name = self.pacs.name(instance.study, instance.series, instance.sop)
            if done.skip is not None:
                self.missing.append(Skip(name, done.skip))
                continue
            if done.report is not None or done.path is None:
                continue
            accession = done.meta.get("AccessionNumber", instance.accession)
            text = (table.report(instance.study, accession) if table else "") or " ".join(
                sr.get(instance.study, [])
            )
            text = text or self.indexed_reports.get(instance.study, "")
            self.items.append(ManifestItem(done.path, instance.relpath, text, dict(done.meta)))
            self.names[str(done.path)] = name
        self.items.sort(key=lambda item: item.relpath)
        self.missing.sort(key=lambda s: s.path)

    def version_info(self, inherited: dict[str, Any] | None = None) -> dict[str, Any]:
        """{"dicomweb": {URL: filters and cursor}}, for build and sync. An add records nothing: it
        looks at no deletions, so the position of the last build or sync must stay the one a
        sync starts from."""
        if not self.record:
            return {}
        recorded = dict((inherited or {}).get(KIND) or {})
        recorded[self.pacs.url] = {**self.pacs.filters(), **self.cursor}
        return {KIND: recorded}

    def finish(self, conn, skipped: list[Skip]) -> dict[str, Any]:
        prefix = self.pacs.prefix + "/"
        mine = [(s.path, s.reason) for s in skipped if s.path.startswith(prefix)]
        reports = [
            (
                self.pacs.name(d.instance.study, d.instance.series, d.instance.sop),
                f"structured report: its text is the report of study {d.instance.study}",
            )
            for d in self.fetched
            if d.report is not None
        ]
        if mine or reports:
            metadata.record_not_indexed(conn, mine + reports)
        sr = self.sr_texts
        filled = sum(
            metadata.fill_reports_under(conn, self.pacs.study_prefix(study), " ".join(texts))
            for study, texts in sr.items()
            if study in self.indexed_studies
        )
        counts = {
            "fetched": self.downloads.get("fetched", 0),
            "fetch_resumed": self.downloads.get("resumed", 0),
            "structured_reports": len(reports),
        }
        if self.not_fetched:
            counts["already_indexed_not_fetched"] = self.not_fetched
        if filled:
            counts["reports_filled"] = filled
        extra: dict[str, Any] = {"counts": counts}
        table = self.table
        if table is not None:
            studies = {i.study for i in self.instances} | self.indexed_studies
            accessions = {i.accession for i in self.instances if i.accession}
            accessions |= {d.meta.get("AccessionNumber", "") for d in self.fetched} - {""}
            unknown = table.unknown(studies, accessions | self.indexed_accessions)
            joined = sum(1 for item in self.items if item.text)
            counts["report_rows_unknown"] = len(unknown)
            extra["reports"] = {
                "table": str(table.path),
                "rows": table.rows,
                "images_with_report": joined,
                "unknown_rows": len(unknown),
                "unknown_keys": unknown[:UNKNOWN_KEYS_LISTED],
            }
        return extra


def list_source(pacs: Pacs, known: Iterable[str] = (), record: bool = True) -> DicomwebSource:
    """The instances of the PACS the filters take (a QIDO listing), with the sync cursor read
    just before it. `known`: names the index holds already, not fetched again; `record`: whether
    the version records this listing's cursor (a build does, an add does not)."""
    if pacs.reports is not None:
        ReportTable.read(pacs.reports)  # a bad table is an error now, not after the downloads
    cursor = cursor_now(pacs)
    instances = list_instances(pacs, pacs.client())
    known = set(known)
    imaged = {i.study for i in instances if not i.is_report}
    instances = [i for i in instances if not i.is_report or i.study in imaged]
    fresh = [i for i in instances if pacs.name(i.study, i.series, i.sop) not in known]
    if not instances:
        where = ", ".join(
            f"{k} {v}"
            for k, v in (("StudyDate >=", pacs.since), ("Modality in", pacs.modalities))
            if v
        )
        raise DicomwebError(
            f"the PACS at {pacs.url} lists no instances{f' with {where}' if where else ''}: "
            "check --since and --modality"
        )
    return DicomwebSource(
        KIND,
        pacs.url,
        [],
        pacs=pacs,
        instances=fresh,
        cursor=cursor,
        not_fetched=len(instances) - len(fresh),
        record=record,
    )


# -- downloading -------------------------------------------------------------------------------------


def download(
    pacs: Pacs, instances: list[Instance], folder: Path, progress: bool
) -> tuple[list[Fetched], dict[str, int]]:
    """Every instance as a local file in `folder` (those there already are not fetched again),
    classified. A PACS that stops answering raises DicomwebError; what was fetched stays."""
    counts = {"fetched": 0, "resumed": 0}
    local = threading.local()
    lock = threading.Lock()
    bar = tqdm(total=len(instances), desc="fetching", unit="inst", disable=not progress)

    def one(instance: Instance) -> Fetched:
        try:
            return fetch_one(instance)
        finally:
            bar.update(1)

    def fetch_one(instance: Instance) -> Fetched:
        refused = instance.bad_uid() or instance.too_large()
        if refused:
            return Fetched(instance, None, skip=refused)
        path = folder / instance.file_name
        if path.is_file():
            with lock:
                counts["resumed"] += 1
        else:
            if not hasattr(local, "client"):
                local.client = pacs.client()
            try:
                data = retrieve(local.client, instance)
            except _network_errors() as err:
                response = getattr(err, "response", None)
                if response is not None and response.status_code in (404, 410):
                    return Fetched(instance, None, skip="no longer on the PACS (HTTP 404)")
                raise unreachable(pacs, f"fetching instance {instance.sop}", err) from err
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            with lock:
                counts["fetched"] += 1
        return classify(instance, path)

    started = time.perf_counter()
    pool = ThreadPoolExecutor(max(1, pacs.threads), thread_name_prefix="dicomweb-fetch")
    try:
        futures = [pool.submit(one, instance) for instance in instances]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()
        results = [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    log.info(
        "fetched %d instances from %s in %.1fs (%d were there already)",
        counts["fetched"],
        pacs.url,
        time.perf_counter() - started,
        counts["resumed"],
    )
    return results, counts


def classify(instance: Instance, path: Path) -> Fetched:
    """Image, Structured Report, or a reason it cannot be indexed; its metadata from the header."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, defer_size="64 KB", force=True)
    except Exception as err:  # pydicom raises many types for malformed files
        return Fetched(instance, path, skip=f"unreadable DICOM file: {err}")
    meta = {
        key: str(dataset.get(key)) for key in META_KEYWORDS if dataset.get(key) not in (None, "")
    }
    meta.setdefault("StudyInstanceUID", instance.study)
    meta.setdefault("SeriesInstanceUID", instance.series)
    meta.setdefault("SOPInstanceUID", instance.sop)
    sop_class = str(dataset.get("SOPClassUID", ""))
    modality = str(dataset.get("Modality", instance.modality)).upper()
    if modality == SR_MODALITY or sop_class.startswith(SR_CLASS_PREFIX):
        return Fetched(instance, path, meta, report=sr_text(dataset))
    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(dataset.get("SOPClassUID"), "name", "") or sop_class or "unknown SOP class"
        return Fetched(instance, path, meta, skip=f"no pixel data ({kind})")
    file_meta = getattr(dataset, "file_meta", None)
    syntax = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    problem = decoder_problem(syntax) if syntax else None
    if problem:
        return Fetched(instance, path, meta, skip=problem)
    return Fetched(instance, path, meta)


def decoder_problem(syntax: str) -> str | None:
    """Why pixels in this transfer syntax cannot be decoded here, or None."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid} ({uid.name}): no decoder exists for it"
    except Exception as err:  # an unknown or malformed UID
        return f"transfer syntax {uid}: {err}"
    if not decoder.is_available:
        return (
            f"transfer syntax {uid} ({uid.name}): its decoder plugin is not installed here "
            "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or gdcm)"
        )
    return None


# -- sync ----------------------------------------------------------------------------------------------


def sync(root: str | Path, model, pacs: Pacs, options) -> Summary:
    """Bring the index at `root` up to date with the PACS in one new version (or none, when
    nothing changed): new instances embedded, deleted ones removed, the cursor recorded."""
    from . import builder

    with writing(root, "sync", from_current=True, keep=options.keep) as w:
        check_model(w, model)
        recorded = (w.current.info.get(KIND) or {}).get(pacs.url)
        pacs = pacs.with_recorded(recorded)
        if pacs.reports is not None:
            ReportTable.read(pacs.reports)
        with closing(metadata.open_readonly(w.current.meta_path)) as conn:
            images, seen = metadata.paths_under(conn, pacs.prefix + "/")
            studies = {_study_of(name) for name in images}
            reports = {s: metadata.report_under(conn, pacs.study_prefix(s)) for s in studies}
            accessions = metadata.values_under(conn, pacs.prefix + "/", "AccessionNumber")
        plan = plan_sync(pacs, recorded, set(images) | set(seen), studies)
        if not plan.new and not plan.deleted:
            w.unchanged()  # the cursor is not worth a version: the same events are read again
        else:
            source = DicomwebSource(
                KIND,
                pacs.url,
                [],
                pacs=pacs,
                instances=plan.new,
                cursor=plan.cursor,
                indexed_studies=studies,
                indexed_accessions=accessions,
                indexed_reports={s: r for s, r in reports.items() if r},
            )
            embedder = builder.embedder_for(w, model, options) if plan.new else None
            if embedder is None:  # reports joined to indexed studies may bring new sentences
                w.embed_texts = lambda texts: (
                    builder.embedder_for(w, model, options).embed_texts(list(texts)).vectors
                )
            builder.update(w, source, options, embedder, drop=sorted(plan.deleted))
    return w.summary


def _study_of(name: str) -> str:
    match = NAME_PATTERN.match(name)
    return match.group("study") if match else ""


def check_model(w, model) -> None:
    """Refuse another model before any work (without loading its weights)."""
    from convirt.bundle import Bundle, read_bundle_info

    fingerprint = (
        model.fingerprint if isinstance(model, Bundle) else read_bundle_info(model)["fingerprint"]
    )
    check_fingerprint(
        f"index {w.root} (version {w.current.name})", w.current.fingerprint, fingerprint
    )


@dataclass
class SyncPlan:
    new: list[Instance]
    deleted: set[str]
    cursor: dict[str, Any]


def plan_sync(
    pacs: Pacs, recorded: dict[str, Any] | None, known: set[str], studies: set[str]
) -> SyncPlan:
    """What is new on the PACS and what is gone from it, compared with what the index knows."""
    client = pacs.client()
    root = orthanc_root(pacs)
    cursor = cursor_at(pacs, root)
    listing: list[Instance] | None = None
    candidates: list[Instance] = []
    recorded = recorded or {}
    # the feed, unless there is no position to start from or Orthanc's log was reset since
    if root and recorded.get("feed") == "orthanc" and int(recorded["seq"]) <= cursor["seq"]:
        touched, added, _ = orthanc_changes(pacs, root, int(recorded["seq"]))
        candidates = list_instances(pacs, client, touched) if touched else []
        if cursor["instances"] < int(recorded["instances"]) + added:
            listing = list_instances(pacs, client)  # something was deleted: find what
    else:
        listing = list_instances(pacs, client)
    if listing is not None:
        candidates = sorted(
            {i.sop: i for i in [*candidates, *listing]}.values(), key=lambda i: i.relpath
        )
    image_studies = studies | {i.study for i in candidates if not i.is_report}
    new = [
        i
        for i in candidates
        if pacs.name(i.study, i.series, i.sop) not in known
        and (not i.is_report or i.study in image_studies)
    ]
    deleted: set[str] = set()
    if listing is not None:
        present = {pacs.name(i.study, i.series, i.sop) for i in listing}
        deleted = {name for name in known if name not in present}
    if deleted and len(deleted) > pacs.max_removal * len(known):
        raise DicomwebError(
            f"the PACS at {pacs.url} no longer lists {len(deleted)} of the {len(known)} "
            f"instances the index holds from it (more than {pacs.max_removal:.0%}): nothing was "
            "changed. If they really were deleted (or --since/--modality were narrowed on "
            "purpose), run again with --max-removal 1"
        )
    return SyncPlan(new, deleted, cursor)


# -- serving: the file behind a dicomweb:// path -------------------------------------------------------


def fetch_for_serving(row: dict[str, Any], folder: Path | None = None) -> Path:
    """A local copy of an indexed instance, fetched from its PACS (kept in
    $CONVIRT_CACHE_DIR/dicomweb by content hash, so it is fetched once). DicomwebError when the
    PACS cannot give it, or gives other bytes than were indexed."""
    match = NAME_PATTERN.match(row["path"])
    if match is None:
        raise DicomwebError(f"{row['path']} is not a DICOMweb instance name")
    folder = Path(folder) if folder else cache_dir() / KIND
    sha = row["sha256"]
    target = folder / f"{sha}.dcm"
    if target.is_file() and target.stat().st_size == row["size_bytes"]:
        return target
    base = row.get("source") or ""
    if not base.startswith(("http://", "https://")):
        base = f"http://{match.group('where')}"
    pacs = Pacs(base, timeout=SERVE_TIMEOUT_S)
    instance = Instance(match.group("study"), match.group("series"), match.group("sop"))
    try:
        data = retrieve(pacs.client(retry=False), instance)
    except _network_errors() as err:
        raise unreachable(pacs, f"fetching instance {instance.sop}", err, writing=False) from err
    if hashlib.sha256(data).hexdigest() != sha:
        raise DicomwebError(
            f"the PACS at {pacs.url} holds other content under {row['path']} than was indexed: "
            "sync the index (`convirt index sync --dicomweb URL`)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{sha}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target
