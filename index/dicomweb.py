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
- anything else (no pixel data, a transfer syntax nothing here decodes, a frame too large) and
  anything the PACS answers badly for it (not multipart DICOM, over --max-instance-mb, not sent
  within --pacs-deadline) is listed with the reason in build_report.json's skipped list.
What was seen but not indexed is kept in the version's meta.sqlite (table not_indexed), so a
sync, an add or a rebuild does not fetch it again; --retry-skipped fetches it again.

Everything the PACS sends is bounded (index/pacs_http.py: a byte cap and a total deadline per
request; index/pacs_feed.py: listings on disk, capped at --max-listed). Instances are downloaded
into the write's staging area (ROOT/staging/FINGERPRINT/dicomweb/) and embedded from there by the
same job as a folder build; the copies go when the version is published. A PACS that stops
answering mid-way stops the write: nothing is published, and the same command run again fetches
only what it lacks and embeds only what was not staged.

`sync` (index/pacs_sync.py) brings an index up to date with the PACS in one new version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from tqdm import tqdm

from convirt.manifest import ManifestItem, Skip
from convirt.paths import cache_dir

from . import layout, metadata
from .pacs_feed import (  # noqa: F401 (the public names of this module)
    CHANGES_PAGE,
    DEFAULT_MAX_LISTED,
    QIDO_FIELDS,
    QIDO_PAGE,
    SR_MODALITY,
    TAGS,
    UID_PATTERN,
    FeedProblem,
    Instance,
    Listing,
    cursor_at,
    cursor_now,
    list_instances,
    orthanc_changes,
    orthanc_position,
    orthanc_root,
)
from .pacs_http import (  # noqa: F401
    PASSWORD_ENV,
    RETRY_ATTEMPTS,
    SKIP_STATUS,
    TOKEN_ENV,
    USER_ENV,
    WADO_ACCEPT,
    BadAnswer,
    DicomwebError,
    PacsHttp,
    dicom_part,
    network_errors,
    normalised_dicom,
    session,
    unreachable,
)
from .pacs_reports import ReportTable, sr_text
from .sources import REMOTE_SCHEME, Source, shard_of
from .version import Summary

log = logging.getLogger(__name__)

KIND = "dicomweb"
SCHEME = REMOTE_SCHEME
DEFAULT_TIMEOUT_S = 30.0  # per read
DEFAULT_DEADLINE_S = 300.0  # per request, whole: a 256 MB instance at ~1 MB/s
DEFAULT_MAX_INSTANCE_BYTES = 256 << 20  # an instance body; decoding has its own budget
DEFAULT_THREADS = 4  # instances fetched at once
SERVE_TIMEOUT_S = 10.0
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the Structured Report storage SOP classes
FEEDS = ("auto", "orthanc", "qido")
DEFAULT_MAX_REMOVAL = 0.5
REPORT_SKIP_PREFIX = "structured report:"  # not_indexed reasons that are no fault to retry
RETRY_HINT = "--retry-skipped fetches it again"
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
NAME_PATTERN = re.compile(
    r"^dicomweb://(?P<where>.+)/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)"
    r"/instances/(?P<sop>[^/]+)$"
)
UNKNOWN_KEYS_LISTED = 50


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
    deadline_s: float = DEFAULT_DEADLINE_S  # a whole request, however slowly the PACS sends
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES  # one WADO body; more is a skip
    max_listed: int = DEFAULT_MAX_LISTED  # instances one listing may hold; more is an error
    retry_skipped: bool = False  # fetch again what the index remembers as not indexed

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
        """A bounded HTTP client of this PACS (index/pacs_http.py); `retry`: a request that gets
        no answer (or 429, 502, 503, 504) is tried RETRY_ATTEMPTS times in all."""
        return PacsHttp(self, retry=retry, deadline_s=deadline_s)

    def remembered(self, seen: dict[str, str]) -> dict[str, str]:
        """Of what an index remembers as not indexed ({name: reason}), what is not fetched
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
    remembered: dict[str, str] = field(default_factory=dict)  # name -> why skipped before
    unreadable_records: int = 0  # listing records whose UIDs could not be read
    warnings: list[str] = field(default_factory=list)  # for build_report.json
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
        name = self.pacs.instance_name
        again = [i for i in self.instances if name(i) in self.remembered]
        fresh = [i for i in self.instances if name(i) not in self.remembered]
        fetched, counts = download(self.pacs, fresh, folder, progress)
        fetched += [Fetched(i, None, skip=self.remembered[name(i)]) for i in again]
        counts["remembered"] = len(again)
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
        indexed = [self.names[str(item.path)] for item in self.items]
        metadata.forget_not_indexed(conn, indexed)  # skipped before, indexed now (a retry)
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
        if self.downloads.get("remembered"):
            counts["skipped_before_not_fetched"] = self.downloads["remembered"]
        if self.unreadable_records:
            counts["listing_records_unreadable"] = self.unreadable_records
        if filled:
            counts["reports_filled"] = filled
        extra: dict[str, Any] = {"counts": counts}
        if self.warnings:
            extra["warnings"] = list(self.warnings)
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


def list_source(
    pacs: Pacs,
    known: Iterable[str] = (),
    record: bool = True,
    remembered: dict[str, str] | None = None,
) -> DicomwebSource:
    """The instances of the PACS the filters take (a QIDO listing), with the sync cursor read
    just before it. `known`: names the index holds already, not fetched again; `record`: whether
    the version records this listing's cursor (a build does, an add does not); `remembered`:
    {name: reason} of instances skipped before, listed as skips again without a fetch."""
    if pacs.reports is not None:
        ReportTable.read(pacs.reports)  # a bad table is an error now, not after the downloads
    cursor = cursor_now(pacs)
    known = set(known)
    client = pacs.client()
    try:
        with list_instances(pacs, client) as listing:
            imaged = listing.image_studies()
            listed = 0
            fresh = []
            for i in listing:
                if i.is_report and i.study not in imaged:
                    continue
                listed += 1
                if pacs.instance_name(i) not in known:
                    fresh.append(i)
            unreadable = listing.unreadable
    finally:
        client.close()
    if not listed:
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
        not_fetched=listed - len(fresh),
        record=record,
        remembered=dict(remembered or {}),
        unreadable_records=unreadable,
    )


def remembered_skips(root: str | Path, pacs: Pacs) -> dict[str, str]:
    """{name: reason} of this PACS's instances that the current version of `root` (if any)
    remembers as not indexed and a rebuild does not fetch again (see Pacs.remembered)."""
    if layout.read_current(Path(root)) is None:
        return {}
    meta = layout.current_version_dir(Path(root)) / metadata.META_DB
    if not meta.is_file():
        return {}
    with closing(metadata.open_readonly(meta)) as conn:
        _, seen = metadata.paths_under(conn, pacs.prefix + "/")
    kept = pacs.remembered(seen)
    return {n: r for n, r in kept.items() if not r.startswith(REPORT_SKIP_PREFIX)}


# -- downloading -------------------------------------------------------------------------------------


def retrieve(client: PacsHttp, instance: Instance) -> bytes:
    """The instance as a DICOM Part-10 file (as pydicom writes it back), in the transfer syntax
    the PACS holds it in: a streamed WADO-RS GET of at most the PACS's max_instance_bytes,
    within its deadline. BadAnswer (a skip) for anything but a multipart DICOM answer."""
    pacs = client.pacs
    url = (
        f"{pacs.url}/studies/{quote(instance.study, safe='')}/series/"
        f"{quote(instance.series, safe='')}/instances/{quote(instance.sop, safe='')}"
    )
    doing = f"fetching instance {instance.sop}"
    answer = client.get(url, doing, accept=WADO_ACCEPT, max_bytes=pacs.max_instance_bytes)
    try:
        return normalised_dicom(dicom_part(answer))
    except ValueError as err:
        raise client.bad(url, doing, str(err)) from None


def download(
    pacs: Pacs, instances: list[Instance], folder: Path, progress: bool
) -> tuple[list[Fetched], dict[str, int]]:
    """Every instance as a local file in `folder` (those there already are not fetched again),
    classified. An instance the PACS answers badly for is a skip; a PACS that stops answering
    raises DicomwebError (what was fetched stays)."""
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
            except BadAnswer as err:
                log.warning("skipped %s: %s", instance.sop, err)
                return Fetched(instance, None, skip=f"{err.detail} ({RETRY_HINT})")
            except network_errors() as err:
                response = getattr(err, "response", None)
                if response is not None and response.status_code in SKIP_STATUS:
                    status = f"HTTP {response.status_code} {response.reason}"
                    return Fetched(
                        instance, None, skip=f"the PACS answered {status} ({RETRY_HINT})"
                    )
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

    from convirt.decode_budget import ImageDecodeError, check_deflated

    try:
        with open(path, "rb") as f:
            check_deflated(f)  # pydicom would inflate a deflated dataset unbounded
    except ImageDecodeError as err:
        return Fetched(instance, path, skip=str(err))
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


def sync(root: str | Path, model, pacs: Pacs, options) -> Summary:
    """Bring the index at `root` up to date with the PACS in one new version (or none, when
    nothing changed): new instances embedded, deleted ones removed, the cursor recorded
    (index/pacs_sync.py)."""
    from .pacs_sync import sync_pacs

    return sync_pacs(root, model, pacs, options)


# -- serving: the file behind a dicomweb:// path -------------------------------------------------------


def fetch_for_serving(
    row: dict[str, Any], folder: Path | None = None, *, deadline_s: float | None = None
) -> Path:
    """A local copy of an indexed instance, fetched from its PACS (kept in
    $CONVIRT_CACHE_DIR/dicomweb by content hash, so it is fetched once), in at most `deadline_s`
    seconds (default: DEFAULT_DEADLINE_S) and DEFAULT_MAX_INSTANCE_BYTES. DicomwebError when the
    PACS cannot give it, answers badly or too slowly, or gives other bytes than were indexed."""
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
    deadline = deadline_s if deadline_s is not None else DEFAULT_DEADLINE_S
    pacs = Pacs(base, timeout=min(SERVE_TIMEOUT_S, deadline), deadline_s=deadline)
    instance = Instance(match.group("study"), match.group("series"), match.group("sop"))
    client = pacs.client(retry=False)
    try:
        data = retrieve(client, instance)
    except BadAnswer:
        raise
    except network_errors() as err:
        raise unreachable(pacs, f"fetching instance {instance.sop}", err, writing=False) from err
    finally:
        client.close()
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
