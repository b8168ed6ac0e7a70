"""`convirt index sync --dicomweb URL`, and the PACS flags and source of build and add."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import layout
from ..errors import IndexStoreError
from ..sources.dicomweb import pacs as settings
from ..sources.dicomweb.listing import DEFAULT_MAX_LISTED
from ..sources.dicomweb.source import DicomwebSource, list_source, remembered_skips
from ..sources.dicomweb.sync import sync_pacs
from ..version import read_version
from ..write.segments import Listing
from .options import add_job_options, add_model, add_root, options, subparser


def add_sync(commands) -> None:
    p = subparser(
        commands,
        "sync",
        "bring the index up to date with a PACS",
        "Adds the instances the PACS holds that the index lacks and removes those it no longer\n"
        "holds, in one new version (none when nothing changed, so running it again is a no-op).\n"
        "New instances are found by Orthanc's /changes feed when the server is Orthanc (GET\n"
        "/system answers), else by a QIDO listing (StudyDate >= --since, --modality); deletions by\n"
        "a QIDO listing (on Orthanc only when its instance count dropped). The feed position is\n"
        "stored in version.json with the data. Filters and --reports default to those of the\n"
        "last build or sync from the same URL. Killed or cut off from the PACS, it publishes\n"
        "nothing; run it again and it resumes. Run it on a timer (cron, a systemd timer, a\n"
        "Kubernetes CronJob).",
    )
    add_root(p, "--root", "index root written by `convirt index build`")
    add_model(p)
    p.add_argument("--dicomweb", required=True, metavar="URL", help="DICOMweb base URL of the PACS")
    add_dicomweb_options(p)
    p.add_argument(
        "--max-removal",
        type=float,
        default=settings.DEFAULT_MAX_REMOVAL,
        metavar="FRACTION",
        help="refuse to remove more than this fraction of the PACS's images in one sync, in case "
        "the PACS answers an empty or cut-short listing (default: %(default)s; 1: no limit)",
    )
    p.add_argument(
        "--feed",
        choices=settings.FEEDS,
        default="auto",
        help="how new instances are found: orthanc (its /changes feed), qido (a listing), or "
        "auto (orthanc when GET /system answers; default)",
    )
    add_job_options(p)
    p.set_defaults(run=run_sync)


def add_dicomweb_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("PACS (with --dicomweb)")
    group.add_argument(
        "--since", metavar="DATE", help="only studies of this date or later (YYYY-MM-DD)"
    )
    group.add_argument(
        "--modality",
        metavar="LIST",
        help="only these modalities, comma-separated (e.g. CR,DX,CT); Structured Reports (SR) "
        "of their studies are always read for the report text",
    )
    group.add_argument(
        "--reports",
        type=Path,
        metavar="CSV",
        help="the RIS report table: a StudyInstanceUID or AccessionNumber column and a report "
        "(or text) column, joined to the images; it wins over SR text",
    )
    pacing = (  # flag, type, default, metavar, what it sets
        ("--pacs-timeout", float, settings.DEFAULT_TIMEOUT_S, "S",
         "seconds to wait for the PACS per request"),
        ("--fetch-threads", int, settings.DEFAULT_THREADS, "N", "instances fetched at once"),
    )  # fmt: skip
    for flag, kind, default, metavar, text in pacing:
        group.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default: %(default)s)"
        )
    limits = (  # flag, environment variable, type, default, metavar, what it bounds
        ("--pacs-deadline", "CONVIRT_PACS_DEADLINE_S", float, settings.DEFAULT_DEADLINE_S, "S",
         "seconds one request may take in all, however slowly the PACS sends; an instance not "
         "fetched by then is skipped"),
        ("--max-instance-mb", "CONVIRT_PACS_MAX_INSTANCE_MB", float,
         settings.DEFAULT_MAX_INSTANCE_BYTES / 2**20, "MB",
         "an instance larger than this is skipped, not fetched whole"),
        ("--max-listed", "CONVIRT_PACS_MAX_LISTED", int, DEFAULT_MAX_LISTED, "N",
         "instances one listing may return before it is taken as endless and the command stops"),
    )  # fmt: skip
    for flag, env, kind, default, metavar, text in limits:
        group.add_argument(
            flag,
            type=kind,
            default=settings.setting(env, default, kind),
            metavar=metavar,
            help=f"{text} (default: %(default)s; env {env})",
        )
    group.add_argument(
        "--retry-skipped",
        action="store_true",
        help="fetch again the instances the index remembers as skipped (a PACS fault since "
        "fixed, a decoder installed since); without it they are not fetched again",
    )


def pacs_of(args: argparse.Namespace) -> settings.Pacs:
    return settings.Pacs(
        args.dicomweb,
        since=args.since,
        modalities=args.modality or (),
        reports=args.reports,
        timeout=args.pacs_timeout,
        feed=getattr(args, "feed", "auto"),
        threads=args.fetch_threads,
        max_removal=getattr(args, "max_removal", settings.DEFAULT_MAX_REMOVAL),
        deadline_s=args.pacs_deadline,
        max_instance_bytes=int(args.max_instance_mb * 2**20),
        max_listed=args.max_listed,
        retry_skipped=args.retry_skipped,
    )


def run_sync(args: argparse.Namespace) -> int:
    print(sync_pacs(args.root, args.model, pacs_of(args), options(args)).line())
    return 0


def load_source(args: argparse.Namespace, known_root: Path | None = None) -> DicomwebSource:
    """The instances --dicomweb lists. known_root (add): those that root's current version holds
    already are not fetched again, and the add records no sync position."""
    pacs = pacs_of(args)
    if known_root is None:
        return list_source(pacs, remembered=remembered_skips(args.root, pacs))
    current = read_version(layout.current_version_dir(known_root))
    images, seen = Listing.of(current).paths_under(pacs.prefix + "/")
    return list_source(pacs, set(images) | set(pacs.remembered(seen)), record=False)


def refuse_flags(args: argparse.Namespace) -> None:
    """The PACS filters are an error with a local source."""
    used = [f"--{n}" for n in ("since", "modality", "reports") if getattr(args, n) is not None]
    if used:
        raise IndexStoreError(f"{', '.join(used)}: only with --dicomweb URL")
