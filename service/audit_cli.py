"""`convirt audit`: read the service's audit log (CONVIRT_AUDIT_LOG), export it, verify its chain."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from .audit import AuditError, Filters, parse_time, query_hash, read_entries, read_salt, verify

LOG_ENV = "CONVIRT_AUDIT_LOG"
CSV_COLUMNS = [
    "seq", "time", "user", "name", "role", "client", "method", "endpoint", "status",
    "query_hash", "query_text", "upload_hash", "images", "results", "hash",
]  # fmt: skip

DESCRIPTION = """\
The audit log of `convirt serve`: who (key id and name, or proxy user) searched or viewed what,
and when. `convirt audit` lists entries, filtered; --csv writes them as CSV. `convirt audit verify`
recomputes the hash chain and exits 1 naming the first line edited, deleted or inserted.
"""

EPILOG = """examples:
  convirt audit --user alice --since 2025-06-01 --until 2025-06-30T12:00
  convirt audit --image 8572477811055107 --csv > who-saw-it.csv
  convirt audit --query "large right pleural effusion"     # found by its salted hash
  convirt audit verify
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convirt audit",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", nargs="?", choices=["list", "verify"], default="list")
    parser.add_argument("--log", type=Path, help=f"the audit log (default: ${LOG_ENV})")
    parser.add_argument("--user", help="a key id or name, or a proxy user")
    parser.add_argument("--since", type=parse_time, help="from this ISO date or time (UTC)")
    parser.add_argument("--until", type=parse_time, help="up to this ISO date or time (UTC)")
    parser.add_argument("--image", help="entries that viewed or returned this image id")
    parser.add_argument("--endpoint", help="entries whose endpoint contains this, e.g. explain")
    parser.add_argument("--query", help="entries with this query text (hashed with the salt)")
    parser.add_argument("--csv", action="store_true", help="write CSV to standard output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    path = args.log or (Path(os.environ[LOG_ENV]) if os.environ.get(LOG_ENV) else None)
    if path is None:
        print(f"convirt audit: give --log PATH or set {LOG_ENV}", file=sys.stderr)
        return 2
    if args.action == "verify":
        verdict = verify(path)
        if not verdict.ok:
            where = f"line {verdict.line}: " if verdict.line else ""
            print(f"convirt audit verify: {path}: {where}{verdict.problem}", file=sys.stderr)
            return 1
        print(f"{path}: {verdict.entries} entries, the chain is intact")
        return 0
    try:
        return list_entries(path, args)
    except (AuditError, OSError) as err:
        print(f"convirt audit: {err}", file=sys.stderr)
        return 1


def list_entries(path: Path, args: argparse.Namespace) -> int:
    hashed = None
    if args.query is not None:
        salt = read_salt(path)
        hashed = query_hash(salt, args.query) if salt is not None else None
    filters = Filters(
        user=args.user,
        since=args.since,
        until=args.until,
        image=args.image,
        endpoint=args.endpoint,
        query_hash=hashed,
        query_text=args.query,
    )
    entries = (entry for entry in read_entries(path) if filters.keep(entry))
    if args.csv:
        writer = csv.DictWriter(sys.stdout, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for entry in entries:
            row = {**entry}
            row["images"] = " ".join(entry.get("images") or [])
            row["results"] = " ".join(entry.get("results") or [])
            writer.writerow(row)
        return 0
    for entry in entries:
        query = ""
        if entry.get("query_text") is not None:
            query = f" query={entry['query_text']!r}"
        elif entry.get("query_hash"):
            query = f" query#={entry['query_hash'][:16]}"
        images = " images=" + ",".join(entry["images"]) if entry.get("images") else ""
        results = f" results={len(entry.get('results') or [])}"
        who = entry.get("user", "?")
        if entry.get("name") and not str(who).endswith(str(entry["name"])):
            who = f"{who}({entry['name']})"
        print(
            f"{entry.get('seq')} {entry.get('time')} {who} {entry.get('method')} "
            f"{entry.get('endpoint')} {entry.get('status')}{query}{images}{results}"
        )
    return 0
