"""`convirt keys`: create, list and revoke the service's API keys (CONVIRT_AUTH_DB)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from convirt.cli_options import command_parser

from .keys import ROLES, KeyRegistry, KeyRegistryError

DB_ENV = "CONVIRT_AUTH_DB"

DESCRIPTION = """\
API keys of `convirt serve`, kept hashed in a SQLite file (--db, or CONVIRT_AUTH_DB: the same file
the service reads). Roles: reader (search and view images and reports), admin (also the admin API,
e.g. POST /v1/admin/reload). A key is printed once, when it is created: store it then. A revoked
key stops working within a second, without a restart. Clients send it as the X-API-Key header.
"""

EPILOG = """examples:
  export CONVIRT_AUTH_DB=/var/lib/convirt/keys.sqlite
  convirt keys add --name "reading room 3" --role reader
  convirt keys add --name ops --role admin --expires-days 90
  convirt keys list
  convirt keys revoke 3f9a1c2b7d4e5f60
"""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("convirt keys", DESCRIPTION, EPILOG)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a key and print it (once)")
    add.add_argument("--name", required=True, help="who or what holds it (shown in the audit log)")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--expires-days", type=float, help="stop working after this many days")
    listing = commands.add_parser("list", help="every key: id, name, role, state (no secrets)")
    revoke = commands.add_parser("revoke", help="stop a key from working")
    revoke.add_argument("key_id", help="the id `convirt keys list` shows")
    for sub in (add, listing, revoke):
        sub.add_argument("--db", type=Path, help=f"the key database (default: ${DB_ENV})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    db = args.db or (Path(os.environ[DB_ENV]) if os.environ.get(DB_ENV) else None)
    if db is None:
        print(f"convirt keys: give --db PATH or set {DB_ENV}", file=sys.stderr)
        return 2
    try:
        registry = KeyRegistry(db, create=args.command == "add")
        if args.command == "add":
            key, record = registry.add(args.name, args.role, args.expires_days)
            print(key)
            expiry = f", expires {record.expires_at}" if record.expires_at else ""
            print(
                f"key {record.id} ({record.name}, {record.role}{expiry}): shown only now; "
                "send it as the X-API-Key header",
                file=sys.stderr,
            )
        elif args.command == "list":
            print(f"{'id':16}  {'role':6}  {'state':7}  {'created':25}  {'expires':25}  name")
            for record in registry.records():
                print(
                    f"{record.id:16}  {record.role:6}  {record.state():7}  {record.created_at:25}  "
                    f"{record.expires_at or '-':25}  {record.name}"
                )
        else:
            record = registry.revoke(args.key_id)
            print(f"revoked key {record.id} ({record.name}, {record.role}) at {record.revoked_at}")
    except KeyRegistryError as err:
        print(f"convirt keys {args.command}: {err}", file=sys.stderr)
        return 1
    return 0
