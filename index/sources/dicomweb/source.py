"""A PACS as a Source of index.write: a QIDO listing of its instances; `fetch` downloads them
into the staging area and makes them items, with their study's report; `finish` records what was
skipped and fills the reports of studies already indexed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from convirt.manifest import ManifestItem, Skip

from ... import layout, metadata
from ...write import rows
from ..base import Source, shard_of
from .download import Fetched, download
from .http import DicomwebError
from .listing import Instance, list_instances
from .orthanc import cursor_now
from .pacs import KIND, REPORT_SKIP_PREFIX, Pacs
from .reports import ReportTable

UNKNOWN_KEYS_LISTED = 50


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
        self.items, self.skipped, self.names = [], [], {}
        for done in self.fetched:
            instance = done.instance
            name = self.pacs.name(instance.study, instance.series, instance.sop)
            if done.skip is not None:
                self.skipped.append(Skip(name, done.skip))
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
        self.skipped.sort(key=lambda s: s.path)

    def source_info(self, inherited: dict[str, Any] | None = None) -> dict[str, Any]:
        """{"dicomweb": {URL: filters and cursor}}, for build and sync. An add records nothing: it
        looks at no deletions, so the position of the last build or sync must stay the one a
        sync starts from."""
        if not self.record:
            return {}
        recorded = dict((inherited or {}).get(KIND) or {})
        recorded[self.pacs.url] = {**self.pacs.filters(), **self.cursor}
        return {KIND: recorded}

    def changes_rows(self, meta: Path) -> bool:
        """Whether a report this sync read (a Structured Report) fills images of that segment
        (indexed studies' images without a report)."""
        studies = [s for s in self.sr_texts if s in self.indexed_studies]
        if not studies:
            return False
        with closing(metadata.open_readonly(meta)) as conn:
            return any(rows.lacks_report_under(conn, self.pacs.study_prefix(s)) for s in studies)

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
        rows.forget_skipped(conn, indexed)  # skipped before, indexed now (a retry)
        if mine or reports:
            rows.record_skipped(conn, mine + reports)
        sr = self.sr_texts
        filled = sum(
            rows.fill_reports_under(conn, self.pacs.study_prefix(study), " ".join(texts))
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
    remembers as skipped and a rebuild does not fetch again (see Pacs.remembered)."""
    if layout.read_current(Path(root)) is None:
        return {}
    from ...version import read_version
    from ...write.segments import Listing

    current = read_version(layout.current_version_dir(Path(root)))
    if not all(f.meta_path.is_file() for f in current.segments()):
        return {}
    _, seen = Listing.of(current).paths_under(pacs.prefix + "/")
    kept = pacs.remembered(seen)
    return {n: r for n, r in kept.items() if not r.startswith(REPORT_SKIP_PREFIX)}
