"""`convirt index info|verify`: what a root holds, and whether its files agree."""

from __future__ import annotations

import argparse
import json

from convirt.bundle import read_bundle_info
from convirt.cli_options import add_model_option

from ..write import checks
from .options import add_root, subparser


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
    add_model_option(p, required=False, help="also check the index was built with this bundle")
    p.add_argument("--hashes", action="store_true", help="re-hash every image file (slower)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_verify)


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
