"""The chain's cryptography and the small files kept beside or away from the log.

Why a key: a plain SHA-256 chain proves nothing to someone who can write the log, who can
recompute it after any edit. Each entry's `hash` is therefore an HMAC-SHA256 under a key the log's
disk does not hold (CONVIRT_AUDIT_KEY_FILE); LOG.head carries a MAC too, so a cut end cannot be
covered by rewriting the head. Why an anchor: a keyed chain still cannot tell an emptied log from
a new one, nor a cut end whose head was replayed; the anchor (CONVIRT_AUDIT_ANCHOR, on another
disk or host) holds the last seq and hash, and `convirt audit verify` compares the log with it.

Logs written before the key existed keep their plain SHA-256 entries: the key file records the
first seq chained with the key (`keyed_from`), so the older part verifies as it was written and
nothing later can be passed off as older.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.layout import fsync_dir

GENESIS = "0" * 64  # `prev` of the first entry
ANCHOR_BYTES = 256  # the anchor is one fixed-width record, overwritten in place


class AuditError(RuntimeError):
    """The audit log cannot be read or written; `public` is what a refused client is told."""

    public = "not answered: the audit entry of this request could not be written"


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def body_of(entry: dict[str, Any]) -> bytes:
    """What an entry's hash covers: everything but the hash (its `prev` included: the chain)."""
    return canonical({k: v for k, v in entry.items() if k != "hash"})


def plain_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry: the chain of logs written before the keyed chain."""
    return hashlib.sha256(body_of(entry)).hexdigest()


entry_hash = plain_hash  # the name older callers used


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the salt (query hashes) -------------------------------------------------------------------


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def salt_path(path: Path) -> Path:
    return path.with_name(path.name + ".salt")


def default_key_path(path: Path) -> Path:
    return path.with_name(path.name + ".key")


def create_secret_file(path: Path, text: str) -> None:
    """Write `text` to a new owner-only file; nothing when another process made it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_salt(path: Path, create: bool = False) -> bytes | None:
    """The log's secret salt (LOG.salt), made on first use when `create`."""
    salt_file = salt_path(path)
    if create and not salt_file.exists():
        create_secret_file(salt_file, secrets.token_hex(32) + "\n")
    try:
        return bytes.fromhex(salt_file.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise AuditError(f"{salt_file} is not a salt (hex digits): {err}") from err


def query_hash(salt: bytes, query: str | bytes) -> str:
    data = query.encode("utf-8") if isinstance(query, str) else query
    return hmac.new(salt, data, hashlib.sha256).hexdigest()


# -- the chain key -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainKey:
    """The HMAC key of the chain and the first seq it covers (older entries: plain SHA-256)."""

    secret: bytes
    keyed_from: int
    path: Path

    def hash(self, entry: dict[str, Any], seq: int) -> str:
        """The hash entry number `seq` must carry."""
        if seq < self.keyed_from:
            return plain_hash(entry)
        return hmac.new(self.secret, body_of(entry), hashlib.sha256).hexdigest()

    def head_mac(self, seq: int, hash_: str) -> str:
        return hmac.new(self.secret, f"head {seq} {hash_}".encode(), hashlib.sha256).hexdigest()


def key_path(log: Path, configured: Path | None) -> Path:
    return Path(configured) if configured is not None else default_key_path(log)


def load_key(path: Path) -> ChainKey | None:
    """The key file: JSON {"key": hex, "keyed_from": seq}, or one line of hex (keyed from 1)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except PermissionError as err:
        raise AuditError(f"the audit chain key {path} cannot be read: {err}") from err
    try:
        if text.startswith("{"):
            data = json.loads(text)
            return ChainKey(bytes.fromhex(data["key"]), int(data.get("keyed_from", 1)), path)
        return ChainKey(bytes.fromhex(text), 1, path)
    except (ValueError, KeyError, TypeError) as err:
        raise AuditError(
            f"{path} is not an audit chain key (JSON with a hex `key`, or hex digits): {err}"
        ) from err


def create_key(path: Path, keyed_from: int) -> ChainKey:
    """A new key (32 random bytes), owner-only; a key another process wrote first wins."""
    record = {"key": secrets.token_hex(32), "keyed_from": keyed_from}
    create_secret_file(path, json.dumps(record) + "\n")
    key = load_key(path)
    assert key is not None
    return key


# -- LOG.head and the anchor ---------------------------------------------------------------------


def write_head(path: Path, seq: int, hash_: str, key: ChainKey | None = None) -> None:
    """LOG.head: the last seq and hash (with a MAC under the key), replaced atomically."""
    head = head_path(path)
    record: dict[str, Any] = {"seq": seq, "hash": hash_}
    if key is not None and seq >= key.keyed_from:
        record["mac"] = key.head_mac(seq, hash_)
    temporary = head.with_name(head.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical(record) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, head)
    fsync_dir(head.parent)  # the rename itself


def write_anchor(anchor: Path, seq: int, hash_: str, time: str) -> None:
    """Overwrite the anchor's one record in place (fixed width: never torn across sizes). Not
    fsynced: after a power cut it may lag the log, which verify accepts; it is never ahead."""
    record = canonical({"seq": seq, "hash": hash_, "time": time})
    data = record + b" " * (ANCHOR_BYTES - 1 - len(record)) + b"\n"
    fd = os.open(anchor, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    if written != len(data):
        raise AuditError(f"the audit anchor {anchor}: short write ({written} of {len(data)})")


def read_anchor(anchor: Path) -> tuple[int, str] | None:
    """(seq, hash) the anchor holds; None when there is no anchor file yet."""
    try:
        text = anchor.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        return int(record["seq"]), str(record["hash"])
    except (ValueError, KeyError, TypeError) as err:
        raise AuditError(f"the audit anchor {anchor} is not an anchor record: {err}") from err
