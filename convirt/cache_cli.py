"""`convirt cache`: build the decoded-image cache ahead of training, and inspect it."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from itertools import chain
from pathlib import Path

from .cachebuild import Resolver, default_workers
from .cli_options import add_no_progress_option
from .imagecache import CacheError, ImageCache, default_root
from .manifest import ManifestError, iter_manifest

SIDES = "219 for the cpu config (192 px crops), 256 for gpu and paper (224 px crops)"


DESCRIPTION = """\
Decode every image of one or more manifests once (DICOM rules applied), shrink it so its shorter \
side is --size, and store it in the image cache that training, evaluation and resumes read. Safe \
to stop at any moment: run it again to go on. `convirt train` fills the cache by itself when \
images are missing from it."""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convirt cache", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="fill the cache from manifests")
    build.add_argument(
        "--manifest", action="append", type=Path, required=True, dest="manifests",
        help="CSV or JSONL with an image column; repeat to combine",
    )  # fmt: skip
    build.add_argument("--size", type=int, required=True, help=f"shorter side in pixels: {SIDES}")
    build.add_argument("--split", help="only rows of this split (default: every row)")
    build.add_argument("--image-column", default="image")
    build.add_argument(
        "--workers", type=int, default=default_workers(),
        help=f"decoding processes (default: every core, {default_workers()})",
    )  # fmt: skip
    build.add_argument("--skipped", type=Path, help="write the skipped files and why, as CSV")
    info = commands.add_parser("info", help="what the cache holds")
    for sub in (build, info):
        sub.add_argument(
            "--cache", type=Path,
            help=f"cache folder (default: $CONVIRT_CACHE_DIR/images, now {default_root()})",
        )  # fmt: skip
    add_no_progress_option(build)
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        cache = ImageCache(args.cache)
        if args.command == "info":
            print(json.dumps(cache.info(), indent=2))
            return 0
        return build(args, cache)
    except (CacheError, ManifestError) as err:
        print(f"convirt cache: {err}", file=sys.stderr)
        return 2


def build(args: argparse.Namespace, cache: ImageCache) -> int:
    if args.size < 8:
        print("convirt cache: --size must be at least 8 pixels", file=sys.stderr)
        return 2
    items = chain.from_iterable(
        iter_manifest(m, args.split, image_column=args.image_column) for m in args.manifests
    )
    resolver = Resolver(cache, args.size, args.workers, progress=not args.no_progress)
    cached = sum(1 for entry in resolver.resolve(items) if isinstance(entry, tuple))
    counts = resolver.counts
    if args.skipped:
        with open(args.skipped, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "reason"])
            writer.writeheader()
            writer.writerows(s.as_dict() for s in counts.skipped)
    summary = {
        "cache": str(cache.root),
        "size": args.size,
        "rows": counts.rows,
        "cached": cached,
        "hashed": counts.hashed,
        "decoded": counts.decoded,
        "skipped": len(counts.skipped),
    }
    print(json.dumps(summary))
    for skip in counts.skipped[:10]:
        print(f"skipped {skip.path}: {skip.reason}", file=sys.stderr)
    if len(counts.skipped) > 10:
        print(
            f"... and {len(counts.skipped) - 10} more (--skipped FILE lists them)", file=sys.stderr
        )
    return 0
