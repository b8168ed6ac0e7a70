"""`convirt index sync --dicomweb URL`: an index brought up to date with its PACS in one version.

What is new is found by Orthanc's /changes feed when the server is Orthanc (GET /system answers),
else by listing the instances by QIDO (StudyDate >= --since, the modalities); what was deleted is
found by listing (on Orthanc only when its instance count says something went). A feed that is
stuck or garbled is warned about and the listing used instead, so the sync still ends (and the
index lock is released). The feed position is stored in version.json ("dicomweb": {URL:
cursor}), published atomically with the data it describes. Nothing new: nothing is published.

What the index remembers as skipped (unreadable instances, Structured Reports) is not fetched
again; with --retry-skipped the unreadable instances are.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import metadata
from ...errors import check_fingerprint
from ...write import build, compact, rows
from ...write.segments import Listing
from ...write.template import Summary, writing
from .http import DicomwebError
from .listing import Instance, list_instances
from .orthanc import FeedProblem, cursor_at, orthanc_changes, orthanc_root
from .pacs import KIND, NAME_PATTERN, Pacs
from .reports import ReportTable
from .source import DicomwebSource

log = logging.getLogger(__name__)


def sync_pacs(root: str | Path, model, pacs: Pacs, options) -> Summary:
    """Bring the index at `root` up to date with the PACS in one new version (or none, when
    nothing changed): new instances embedded, deleted ones removed, the cursor recorded."""
    with writing(root, "sync", from_current=True, keep=options.keep) as w:
        check_model(w, model)
        recorded = (w.current.info.get(KIND) or {}).get(pacs.url)
        pacs = pacs.with_recorded(recorded)
        if pacs.reports is not None:
            ReportTable.read(pacs.reports)
        listing = Listing.of(w.current)
        images, seen = listing.paths_under(pacs.prefix + "/")
        studies = {_study_of(name) for name in images}
        reports, accessions = {}, set()
        for files in listing.files:  # a deleted row's report or accession number still counts
            with closing(metadata.open_readonly(files.meta_path)) as conn:
                for s in studies:
                    reports[s] = reports.get(s) or rows.report_under(conn, pacs.study_prefix(s))
                accessions |= rows.values_under(conn, pacs.prefix + "/", "AccessionNumber")
        known = set(images) | set(pacs.remembered(seen))
        plan = plan_sync(pacs, recorded, known, studies, present=set(images) | set(seen))
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
                unreadable_records=plan.unreadable,
                warnings=plan.warnings,
            )
            embedder = build.embedder_for(w, model, options) if plan.new else None
            if embedder is None:  # reports joined to indexed studies may bring new sentences
                w.embed_texts = lambda texts: (
                    build.embedder_for(w, model, options).embed_texts(list(texts)).vectors
                )
            build.update(w, source, options, embedder, drop=sorted(plan.deleted))
    w.summary.compaction = compact.by_policy(root, options.keep)
    return w.summary


def _study_of(name: str) -> str:
    match = NAME_PATTERN.match(name)
    return match.group("study") if match else ""


def _sop_of(name: str) -> str:
    match = NAME_PATTERN.match(name)
    return match.group("sop") if match else ""


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
    unreadable: int = 0
    warnings: list[str] | None = None


def plan_sync(
    pacs: Pacs,
    recorded: dict[str, Any] | None,
    known: set[str],
    studies: set[str],
    present: set[str] | None = None,
) -> SyncPlan:
    """What is new on the PACS (not in `known`) and what is gone from it (of `present`, default
    `known`: what the index holds or remembers), compared with what the index knows."""
    present = known if present is None else present
    client = pacs.client()
    warnings: list[str] = []
    root = orthanc_root(pacs)
    cursor = cursor_at(pacs, root)
    recorded = recorded or {}
    touched: set[str] | None = None
    relist = True
    # the feed, unless there is no position to start from or Orthanc's log was reset since
    if cursor.get("feed") == "orthanc" and recorded.get("feed") == "orthanc":
        since = recorded.get("seq")
        if isinstance(since, int) and since <= cursor["seq"]:
            try:
                touched, added, _ = orthanc_changes(pacs, root, since)
                relist = cursor["instances"] < int(recorded.get("instances", 0)) + added
            except FeedProblem as err:
                warning = f"{err}; listing the PACS instead (a QIDO listing finds the same)"
                log.warning("%s", warning)
                warnings.append(warning)
                touched, relist = None, True
    try:
        candidates: dict[str, Instance] = {}
        unreadable = 0
        if touched:
            with list_instances(pacs, client, touched) as listing:
                candidates.update((i.sop, i) for i in listing)
                unreadable += listing.unreadable
        deleted: set[str] = set()
        image_studies = set(studies)
        if relist:
            with list_instances(pacs, client) as listing:
                unreadable += listing.unreadable
                image_studies |= listing.image_studies()
                new = _new_in(pacs, listing, known, image_studies)
                deleted = {n for n in present if _sop_of(n) not in listing}
        else:
            new = []
        image_studies |= {i.study for i in candidates.values() if not i.is_report}
        new += _new_in(pacs, candidates.values(), known, image_studies)
    finally:
        client.close()
    new = sorted({i.sop: i for i in new}.values(), key=lambda i: i.relpath)
    holds = len(present)
    if deleted and len(deleted) > pacs.max_removal * holds:
        raise DicomwebError(
            f"the PACS at {pacs.url} no longer lists {len(deleted)} of the {holds} "
            f"instances the index holds from it (more than {pacs.max_removal:.0%}): nothing was "
            "changed. If they really were deleted (or --since/--modality were narrowed on "
            "purpose), run again with --max-removal 1"
        )
    return SyncPlan(new, deleted, cursor, unreadable, warnings)


def _new_in(pacs: Pacs, instances, known: set[str], image_studies: set[str]) -> list[Instance]:
    return [
        i
        for i in instances
        if pacs.instance_name(i) not in known and (not i.is_report or i.study in image_studies)
    ]
