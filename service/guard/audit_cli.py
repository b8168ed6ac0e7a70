"""`convirt audit`: read the service's audit log (CONVIRT_AUDIT_LOG), export it, verify its chain,
rotate it. docs/audit.md says what the log guarantees and how to keep it."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any

from convirt.cli_options import command_parser

from .audit import (
    AuditError,
    AuditLog,
    Filters,
    log_files,
    parse_time,
    query_hash,
    read_entries,
    read_salt,
    result_count,
    result_ids,
    verify,
)

LOG_ENV = "CONVIRT_AUDIT_LOG"
KEY_ENV = "CONVIRT_AUDIT_KEY_FILE"
ANCHOR_ENV = "CONVIRT_AUDIT_ANCHOR"
CSV_COLUMNS = [
    "seq", "time", "user", "name", "role", "client", "method", "endpoint", "status",
    "query_hash", "query_text", "upload_hash", "images", "results", "results_count",
    "results_sha256", "hash",
]  # fmt: skip
# A spreadsheet runs a cell starting with one of these as a formula (OWASP, CSV injection)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

DESCRIPTION = """\
The audit log of `convirt serve`: who (key id and name, or proxy user) searched or viewed what,
and when. `convirt audit` lists entries, filtered; --csv writes them as CSV (cells a spreadsheet
would run as formulas start with '). `convirt audit verify` recomputes the keyed hash chain over
every file of the log and checks it against LOG.head and the anchor: it exits 1 naming the first
line edited, deleted or inserted, or the end cut off. `convirt audit rotate` starts a new file
chained to the old one (--keep N: delete all but the N newest rotated files).
"""

EPILOG = """examples:
  convirt audit --user alice --since 2025-06-01 --until 2025-06-30T12:00
  convirt audit --image 8572477811055107 --csv > who-saw-it.csv
  convirt audit --query "large right pleural effusion"     # found by its salted hash
  convirt audit verify --key-file /etc/convirt/audit.key --anchor /mnt/anchor/audit.anchor
  convirt audit rotate --keep 12
"""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("convirt audit", DESCRIPTION, EPILOG)
    parser.add_argument("action", nargs="?", choices=["list", "verify", "rotate"], default="list")
    parser.add_argument("--log", type=Path, help=f"the audit log (default: ${LOG_ENV})")
    parser.add_argument(
        "--key-file", type=Path, help=f"the chain key (default: ${KEY_ENV}, else LOG.key)"
    )
    parser.add_argument(
        "--anchor", type=Path, help=f"the anchor file to check the end against (${ANCHOR_ENV})"
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="verify: a log from before the keyed chain, with no key file (plain SHA-256)",
    )
    parser.add_argument(
        "--keep", type=int, help="rotate: keep only this many rotated files (archive them first)"
    )
    parser.add_argument("--user", help="a key id or name, or a proxy user")
    parser.add_argument("--since", type=parse_time, help="from this ISO date or time (UTC)")
    parser.add_argument("--until", type=parse_time, help="up to this ISO date or time (UTC)")
    parser.add_argument("--image", help="entries that viewed or returned this image id")
    parser.add_argument("--endpoint", help="entries whose endpoint contains this, e.g. explain")
    parser.add_argument("--query", help="entries with this query text (hashed with the salt)")
    parser.add_argument("--csv", action="store_true", help="write CSV to standard output")
    return parser


def from_env(value: Path | None, name: str) -> Path | None:
    return value or (Path(os.environ[name]) if os.environ.get(name) else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    path = from_env(args.log, LOG_ENV)
    if path is None:
        print(f"convirt audit: give --log PATH or set {LOG_ENV}", file=sys.stderr)
        return 2
    args.key_file = from_env(args.key_file, KEY_ENV)
    args.anchor = from_env(args.anchor, ANCHOR_ENV)
    try:
        if args.action == "verify":
            return run_verify(path, args)
        if args.action == "rotate":
            return run_rotate(path, args)
        return list_entries(path, args)
    except (AuditError, OSError) as err:
        print(f"convirt audit: {err}", file=sys.stderr)
        return 1


def run_verify(path: Path, args: argparse.Namespace) -> int:
    verdict = verify(path, args.key_file, args.anchor, legacy=args.legacy)
    for note in verdict.notes:
        print(f"note: {note}", file=sys.stderr)
    if not verdict.ok:
        where = f"line {verdict.line}: " if verdict.line else ""
        shown = verdict.file or path
        print(f"convirt audit verify: {shown}: {where}{verdict.problem}", file=sys.stderr)
        return 1
    files = len(log_files(path))
    across = f" in {files} files" if files > 1 else ""
    print(f"{path}: {verdict.entries} entries{across}, the chain is intact")
    return 0


def run_rotate(path: Path, args: argparse.Namespace) -> int:
    if not path.exists():
        print(f"convirt audit rotate: no audit log at {path}", file=sys.stderr)
        return 1
    old = AuditLog(path, key_file=args.key_file, anchor=args.anchor).rotate()
    print(f"{path}: rotated to {old.name}; the new file's first entry is chained to its last")
    if args.keep is not None:
        rotated = log_files(path)[:-1]
        for stale in rotated[: max(len(rotated) - args.keep, 0)]:
            stale.unlink()
            print(f"removed {stale.name} (retention: --keep {args.keep})")
    return 0


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, made inert with a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


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
            row["results"] = " ".join(result_ids(entry))
            row["results_count"] = result_count(entry)
            writer.writerow({column: spreadsheet_safe(value) for column, value in row.items()})
        return 0
    for entry in entries:
        query = ""
        if entry.get("query_text") is not None:
            query = f" query={entry['query_text']!r}"
        elif entry.get("query_hash"):
            query = f" query#={entry['query_hash'][:16]}"
        images = " images=" + ",".join(entry["images"]) if entry.get("images") else ""
        results = f" results={result_count(entry)}"
        who = entry.get("user", "?")
        if entry.get("name") and not str(who).endswith(str(entry["name"])):
            who = f"{who}({entry['name']})"
        print(
            f"{entry.get('seq')} {entry.get('time')} {who} {entry.get('method')} "
            f"{entry.get('endpoint')} {entry.get('status')}{query}{images}{results}"
        )
    return 0
