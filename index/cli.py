"""`convirt index`: build, update and inspect a FAISS index of an image archive."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from pathlib import Path

from convirt.bundle import BundleError, read_bundle_info
from convirt.imagecache import CacheError
from convirt.paths import MissingWeightsError

from . import builder, checks, dicomweb, faiss_index, layout, metadata
from .embedding import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_BATCHES, DEFAULT_WORKERS
from .errors import DiskFullError, IndexStoreError
from .sources import Source, parse_shard, scan_folder, single_file
from .sources import read_manifest as read_source_manifest

DESCRIPTION = """\
Build, update and inspect a FAISS index of an image archive (PNG, JPEG, DICOM).

Every write (build, add, remove, reindex, merge, sync) creates a new version under ROOT/versions/
and then switches ROOT/CURRENT to it atomically: readers see the old version until the new one is
complete. A killed build or add, run again with the same arguments, resumes: images already
embedded (known by content hash) are not embedded again. A write that runs out of disk space
stops with exit status 2, naming the disk and the space needed and free; nothing is published.

A PACS is a source too: build and add take --dicomweb URL (QIDO-RS lists, WADO-RS fetches), and
`sync --dicomweb URL` adds what is new on it and removes what was deleted, in one version.
"""

INDEX_TYPE_HELP = (
    f"FAISS structure: auto (exact below {faiss_index.AUTO_EXACT_MAX:,} vectors, HNSW above), "
    "flat (exact), hnsw, ivfpq, or any faiss.index_factory string such as 'IVF256,Flat' "
    "(default: %(default)s)"
)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.run(args) or 0)
    except DiskFullError as err:
        print(f"convirt index {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (IndexStoreError, BundleError, MissingWeightsError, PermissionError, CacheError) as err:
        print(f"convirt index {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"convirt index {args.command}: interrupted; the current version is unchanged and "
            "running the same command again resumes",
            file=sys.stderr,
        )
        return 130


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convirt index",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_build(commands)
    add_add(commands)
    add_remove(commands)
    add_reindex(commands)
    add_merge(commands)
    add_sync(commands)
    add_info(commands)
    add_verify(commands)
    return parser


def subparser(commands, name: str, summary: str, details: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=f"{summary}.\n\n{details}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_build(commands) -> None:
    p = subparser(
        commands,
        "build",
        "embed an archive into a new index version",
        "Scans --images (any depth) or reads --manifest, embeds every image with --model, and\n"
        "writes ROOT/versions/NNNNNN/ with both spaces (joint v for text queries, encoder h for\n"
        "image-to-image), SQLite metadata with thumbnails, and build_report.json listing skipped\n"
        "files with the reason and duplicates. With --shard I/N it embeds one Nth of the archive\n"
        "into ROOT as a shard; `convirt index merge` joins the shards.",
    )
    add_root(p, "--out", "index root (created if needed); with --shard, the shard's directory")
    add_model(p)
    add_source(p)
    p.add_argument("--index-type", default="auto", help=INDEX_TYPE_HELP)
    p.add_argument(
        "--shard",
        type=parse_shard_arg,
        metavar="I/N",
        help="embed only shard I of N (0-based, by path hash) into a shard directory",
    )
    add_job_options(p)
    p.set_defaults(run=run_build)


def add_add(commands) -> None:
    p = subparser(
        commands,
        "add",
        "add new images to the current version",
        "Embeds only images whose content is not indexed yet and copies every existing vector\n"
        "into a new version. A path already indexed with different content is re-embedded and\n"
        "replaces the old entry. --model must be the bundle the index was built with.",
    )
    add_root(p, "--root", "index root written by `convirt index build`")
    add_model(p)
    add_source(p, allow_file=True)
    add_job_options(p)
    p.set_defaults(run=run_add)


def add_remove(commands) -> None:
    p = subparser(
        commands,
        "remove",
        "remove images from the current version",
        "Writes a new version without the given images; nothing is re-embedded. A path may be\n"
        "absolute or relative to the archive it was indexed from; removing a duplicate's path\n"
        "only forgets that path.",
    )
    add_root(p, "--root", "index root")
    p.add_argument(
        "--id",
        type=int,
        action="append",
        default=[],
        dest="ids",
        metavar="ID",
        help="image id (as returned by search); repeatable",
    )
    p.add_argument(
        "--path",
        action="append",
        default=[],
        dest="paths",
        metavar="PATH",
        help="image path; repeatable",
    )
    add_keep(p)
    p.set_defaults(run=run_remove)


def add_reindex(commands) -> None:
    p = subparser(
        commands,
        "reindex",
        "rebuild the FAISS structure with another --index-type",
        "Writes a new version with the same vectors and metadata under another index type\n"
        "(e.g. hnsw once an archive has grown); nothing is re-embedded.",
    )
    add_root(p, "--root", "index root")
    p.add_argument("--index-type", required=True, help=INDEX_TYPE_HELP)
    add_keep(p)
    p.set_defaults(run=run_reindex)


def add_merge(commands) -> None:
    p = subparser(
        commands,
        "merge",
        "join the shards of a sharded build into one index version",
        "Every shard of one `build --shard I/N` run must be given exactly once. The result equals\n"
        "a single build of the whole archive: same ids, paths, metadata and vectors.",
    )
    add_root(p, "--out", "index root to write the merged version into")
    p.add_argument(
        "shards",
        nargs="+",
        type=Path,
        metavar="SHARD_DIR",
        help="directories written by `convirt index build --shard I/N --out SHARD_DIR`",
    )
    p.add_argument("--index-type", default="auto", help=INDEX_TYPE_HELP)
    add_keep(p)
    p.set_defaults(run=run_merge)


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
        default=dicomweb.DEFAULT_MAX_REMOVAL,
        metavar="FRACTION",
        help="refuse to remove more than this fraction of the PACS's images in one sync, in case "
        "the PACS answers an empty or cut-short listing (default: %(default)s; 1: no limit)",
    )
    p.add_argument(
        "--feed",
        choices=dicomweb.FEEDS,
        default="auto",
        help="how new instances are found: orthanc (its /changes feed), qido (a listing), or "
        "auto (orthanc when GET /system answers; default)",
    )
    add_job_options(p)
    p.set_defaults(run=run_sync)


def add_info(commands) -> None:
    p = subparser(
        commands,
        "info",
        "describe the current version",
        "Model fingerprint, image/duplicate/skipped counts, index type, dimensions, file sizes,\n"
        "build time, the versions kept, and unfinished jobs waiting to be resumed.",
    )
    add_root(p, "--root", "index root")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_info)


def add_verify(commands) -> None:
    p = subparser(
        commands,
        "verify",
        "check that index, metadata and image files agree",
        "Checks ids, vectors (normalised), both FAISS indexes, the SQLite metadata and that every\n"
        "indexed image file still exists with its size (--hashes: and its content hash).\n"
        "Damaged files (truncated meta.sqlite, garbled .faiss or .npy) are reported like any\n"
        "other problem. Exit status 1 when a problem is found; each problem says what to do.",
    )
    add_root(p, "--root", "index root")
    p.add_argument("--model", type=Path, help="also check the index was built with this bundle")
    p.add_argument("--hashes", action="store_true", help="re-hash every image file (slower)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_verify)


def add_root(p: argparse.ArgumentParser, flag: str, about: str) -> None:
    other = "--root" if flag == "--out" else "--out"
    p.add_argument(flag, other, dest="root", type=Path, required=True, metavar="ROOT", help=about)


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="BUNDLE",
        help="model bundle directory written by `convirt train` (its bundle/ folder)",
    )


def add_source(p: argparse.ArgumentParser, allow_file: bool = False) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--images",
        type=Path,
        metavar="DIR" + ("|FILE" if allow_file else ""),
        help="folder scanned at any depth for PNG, JPEG and DICOM files"
        + (" (or one image file)" if allow_file else ""),
    )
    group.add_argument(
        "--manifest",
        type=Path,
        metavar="M",
        help="CSV or JSONL: an image column (path relative to the manifest), an "
        "optional report text column, other columns kept as metadata",
    )
    group.add_argument(
        "--dicomweb",
        metavar="URL",
        help="a PACS's DICOMweb base URL (e.g. http://pacs:8042/dicom-web): instances found by "
        "QIDO-RS, fetched by WADO-RS",
    )
    p.add_argument("--image-column", default="image", help="manifest image column (default: image)")
    p.add_argument("--text-column", default="text", help="manifest report column (default: text)")
    add_dicomweb_options(p)


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
    group.add_argument(
        "--pacs-timeout",
        type=float,
        default=dicomweb.DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the PACS per request (default: %(default)s)",
    )
    group.add_argument(
        "--fetch-threads",
        type=int,
        default=dicomweb.DEFAULT_THREADS,
        metavar="N",
        help="instances fetched at once (default: %(default)s)",
    )
    limits = (  # flag, environment variable, type, default, metavar, what it bounds
        ("--pacs-deadline", "CONVIRT_PACS_DEADLINE_S", float, dicomweb.DEFAULT_DEADLINE_S, "S",
         "seconds one request may take in all, however slowly the PACS sends; an instance not "
         "fetched by then is skipped"),
        ("--max-instance-mb", "CONVIRT_PACS_MAX_INSTANCE_MB", float,
         dicomweb.DEFAULT_MAX_INSTANCE_BYTES / 2**20, "MB",
         "an instance larger than this is skipped, not fetched whole"),
        ("--max-listed", "CONVIRT_PACS_MAX_LISTED", int, dicomweb.DEFAULT_MAX_LISTED, "N",
         "instances one listing may return before it is taken as endless and the command stops"),
    )  # fmt: skip
    for flag, env, kind, default, metavar, text in limits:
        group.add_argument(
            flag,
            type=kind,
            default=dicomweb.setting(env, default, kind),
            metavar=metavar,
            help=f"{text} (default: %(default)s; env {env})",
        )
    group.add_argument(
        "--retry-skipped",
        action="store_true",
        help="fetch again the instances the index remembers as skipped (a PACS fault since "
        "fixed, a decoder installed since); without it they are not fetched again",
    )


def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="images per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="processes decoding into the image cache, then threads preparing cached images "
        "ahead of the model (default: %(default)s)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        help="image cache folder (default: $CONVIRT_CACHE_DIR/images): images decoded for "
        "training, evaluation or an earlier build at the model's resize side are not decoded again",
    )
    p.add_argument(
        "--chunk-batches",
        type=int,
        default=DEFAULT_CHUNK_BATCHES,
        help="batches per commit to the staging area, the most a crash can lose "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device for the model: cpu, cuda, cuda:1 or auto (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_keep(p)


def add_keep(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep",
        type=int,
        default=layout.KEEP_VERSIONS,
        help="published versions to keep, the current one included (default: %(default)s)",
    )


def parse_shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except IndexStoreError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def pacs_of(args: argparse.Namespace) -> dicomweb.Pacs:
    return dicomweb.Pacs(
        args.dicomweb,
        since=args.since,
        modalities=args.modality or (),
        reports=args.reports,
        timeout=args.pacs_timeout,
        feed=getattr(args, "feed", "auto"),
        threads=args.fetch_threads,
        max_removal=getattr(args, "max_removal", dicomweb.DEFAULT_MAX_REMOVAL),
        deadline_s=args.pacs_deadline,
        max_instance_bytes=int(args.max_instance_mb * 2**20),
        max_listed=args.max_listed,
        retry_skipped=args.retry_skipped,
    )


def load_source(args: argparse.Namespace, known_root: Path | None = None) -> Source:
    """The source the arguments name. known_root (add): a PACS's instances that root's current
    version holds already are not fetched again, and the add records no sync position."""
    if args.dicomweb is not None:
        pacs = pacs_of(args)
        known: set[str] = set()
        if known_root is not None:
            with closing(
                metadata.open_readonly(layout.current_version_dir(known_root) / metadata.META_DB)
            ) as conn:
                images, seen = metadata.paths_under(conn, pacs.prefix + "/")
            known = set(images) | set(pacs.remembered(seen))
            return dicomweb.list_source(pacs, known, record=False)
        remembered = dicomweb.remembered_skips(args.root, pacs)
        return dicomweb.list_source(pacs, remembered=remembered)
    used = [f"--{n}" for n in ("since", "modality", "reports") if getattr(args, n) is not None]
    if used:
        raise IndexStoreError(f"{', '.join(used)}: only with --dicomweb URL")
    if args.manifest is not None:
        return read_source_manifest(args.manifest, args.image_column, args.text_column)
    if args.images.is_file():
        return single_file(args.images)
    return scan_folder(args.images)


def options(args: argparse.Namespace, index_type: str = "auto") -> builder.Options:
    return builder.Options(
        index_type=index_type,
        batch_size=args.batch_size,
        workers=args.workers,
        chunk_batches=args.chunk_batches,
        device=resolve_device(args.device),
        progress=not args.no_progress,
        keep=args.keep,
        cache_dir=args.cache,
    )


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_build(args: argparse.Namespace) -> int:
    summary = builder.build(
        args.root, args.model, load_source(args), options(args, args.index_type), args.shard
    )
    print(summary.line())
    return 0


def run_add(args: argparse.Namespace) -> int:
    source = load_source(args, known_root=args.root if args.dicomweb else None)
    print(builder.add(args.root, args.model, source, options(args)).line())
    return 0


def run_sync(args: argparse.Namespace) -> int:
    print(dicomweb.sync(args.root, args.model, pacs_of(args), options(args)).line())
    return 0


def run_remove(args: argparse.Namespace) -> int:
    if not args.ids and not args.paths:
        raise IndexStoreError("nothing to remove: give --id ID or --path PATH (repeatable)")
    print(builder.remove(args.root, args.ids, args.paths, args.keep).line())
    return 0


def run_reindex(args: argparse.Namespace) -> int:
    print(builder.reindex(args.root, args.index_type, args.keep).line())
    return 0


def run_merge(args: argparse.Namespace) -> int:
    print(builder.merge(args.root, args.shards, args.index_type, args.keep).line())
    return 0


def run_info(args: argparse.Namespace) -> int:
    data = checks.info(args.root)
    print(json.dumps(data, indent=2) if args.json else checks.format_info(data))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    fingerprint = read_bundle_info(args.model)["fingerprint"] if args.model else None
    result = checks.verify(args.root, fingerprint, args.hashes)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    elif result.ok:
        counts = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in result.checked.items())
        print(f"version {result.version}: ok ({counts})")
    else:
        print(f"version {result.version}: {len(result.problems)} problems")
        print("\n".join(f"  - {problem}" for problem in result.problems))
    return 0 if result.ok else 1
