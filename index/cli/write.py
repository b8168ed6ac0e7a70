"""`convirt index build|add|remove|reindex|merge`: the writes of index.write."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import IndexStoreError
from ..write import build, compact, merge, rewrite
from .options import (
    INDEX_TYPE_HELP,
    add_job_options,
    add_keep,
    add_model,
    add_ram_budget,
    add_root,
    options,
    parse_shard_arg,
    subparser,
)
from .sources import add_source, load_source


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
        "Embeds only images whose content is not indexed yet into one new segment\n"
        "(ROOT/segments/NNNNNN/) and publishes a version listing the existing segments plus it:\n"
        "nothing existing is copied. A path already indexed with different content is re-embedded\n"
        "and replaces the old entry. --model must be the bundle the index was built with. The\n"
        "compaction policy runs afterwards (see `convirt index compact --help`).",
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
        "Writes a new version without the given images: their ids are listed in its deleted.npy,\n"
        "nothing is copied or re-embedded. A path may be absolute or relative to the archive it\n"
        "was indexed from; removing a duplicate's path only forgets that path. The compaction\n"
        "policy runs afterwards (see `convirt index compact --help`).",
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
        "rebuild the FAISS structure, or bring an older version's metadata up to date",
        "Writes a new version with the same vectors and metadata, under another --index-type\n"
        "(e.g. hnsw once an archive has grown) or the current one; nothing is re-embedded.\n"
        "Like every write it re-derives the normalised fields (modality, body_part, with\n"
        "modality_original and body_part_original kept: index/fields.py), so a version built\n"
        "before them, which the service warns of when it loads, needs only\n"
        "`convirt index reindex --root ROOT`.",
    )
    add_root(p, "--root", "index root")
    current = INDEX_TYPE_HELP.replace("%(default)s", "the current version's")
    p.add_argument("--index-type", help=current)
    add_keep(p)
    add_ram_budget(p)
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


def add_compact(commands) -> None:
    p = subparser(
        commands,
        "compact",
        "merge the current version's segments into one, dropping deleted rows",
        "add, sync and remove write segments: each add one new segment holding only its images,\n"
        "each removal a list of deleted ids. compact merges every segment's live rows (vectors,\n"
        "metadata, thumbnails, sentences, duplicates, facets) into one new segment, with FAISS\n"
        "structures chosen for its size, and publishes a version listing it; old versions stay\n"
        "readable until pruned (--keep). Nothing to merge: nothing is published.\n\n"
        "Every add, sync and remove also runs the automatic policy (index/write/compact.py):\n"
        f"a segment with more than {compact.DELETED_SHARE:.0%} of its rows deleted is rewritten "
        "without them,\n"
        f"and when a version lists more than {compact.MAX_SEGMENTS} segments the smallest are "
        f"merged, {compact.MERGE_AT_ONCE} or\n"
        "more at a time, so a small add never rewrites the large segment.",
    )
    add_root(p, "--root", "index root")
    add_keep(p)
    add_ram_budget(p)
    p.set_defaults(run=run_compact)


def run_build(args: argparse.Namespace) -> int:
    summary = build.build(
        args.root, args.model, load_source(args), options(args, args.index_type), args.shard
    )
    print(summary.line())
    return 0


def run_add(args: argparse.Namespace) -> int:
    source = load_source(args, known_root=args.root if args.dicomweb else None)
    print(build.add(args.root, args.model, source, options(args)).line())
    return 0


def run_remove(args: argparse.Namespace) -> int:
    if not args.ids and not args.paths:
        raise IndexStoreError("nothing to remove: give --id ID or --path PATH (repeatable)")
    print(rewrite.remove(args.root, args.ids, args.paths, args.keep).line())
    return 0


def run_reindex(args: argparse.Namespace) -> int:
    print(rewrite.reindex(args.root, args.index_type, args.keep, args.ram_budget).line())
    return 0


def run_compact(args: argparse.Namespace) -> int:
    print(compact.compact(args.root, True, args.keep, args.ram_budget).line())
    return 0


def run_merge(args: argparse.Namespace) -> int:
    print(merge.merge(args.root, args.shards, args.index_type, args.keep).line())
    return 0
