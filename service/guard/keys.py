"""API keys with roles, kept hashed in a small SQLite file (CONVIRT_AUTH_DB, `convirt keys`).

A key reads `cvk_<id>.<secret>`: the id (16 hex digits) is public, names the key in listings and
in the audit log, and finds its row; the secret (32 random bytes, URL-safe base64) is shown once,
when the key is created, and only its SHA-256 digest is stored.

Why SHA-256 and not a slow password hash (bcrypt, scrypt, argon2): those exist to make guessing a
low-entropy human password expensive after a database leak. A secret of 256 random bits cannot be
guessed whatever the hash costs, so a slow hash would add nothing but ~100 ms of CPU to every
request. The digest is compared in constant time (hmac.compare_digest), so response times say
nothing about how much of a guessed secret was right, and the database holds nothing that lets
its reader call the API.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROLES = ("reader", "admin")  # in increasing power: an admin may do all a reader may
PREFIX = "cvk_"
KEY_ID = re.compile(r"[0-9a-f]{16}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('reader', 'admin')),
    digest TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
)
"""


class KeyRegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    role: str
    digest: str
    created_at: str
    expires_at: str | None = None
    revoked_at: str | None = None

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        return datetime.fromisoformat(self.expires_at) <= (now or datetime.now(UTC))

    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        return "expired" if self.expired() else "active"


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if not key.startswith(PREFIX):
        return None
    key_id, dot, secret = key[len(PREFIX) :].partition(".")
    if not dot or not KEY_ID.fullmatch(key_id) or not 20 <= len(secret) <= 200:
        return None
    return key_id, secret


# what a key of an unknown id is compared against, so that it costs what a known one does
UNKNOWN = KeyRecord("", "", "reader", hashlib.sha256(b"no such key").hexdigest(), "")


def matches(record: KeyRecord, secret: str) -> bool:
    return hmac.compare_digest(digest_of(secret), record.digest)


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class KeyRegistry:
    """The keys table. Every call opens its own connection: the service reads it from worker
    threads while `convirt keys` writes it from another process."""

    def __init__(self, path: Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise KeyRegistryError(f"no key database at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # owner only
        try:
            with self._connect() as conn:
                conn.execute(SCHEMA)
        except sqlite3.Error as err:
            raise KeyRegistryError(f"cannot open the key database {self.path}: {err}") from err

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=5)
        try:
            with conn:  # commits, or rolls back on an error
                yield conn
        finally:
            conn.close()

    def add(self, name: str, role: str, expires_days: float | None = None) -> tuple[str, KeyRecord]:
        """A new key: (the key itself, to show once, and its record)."""
        if role not in ROLES:
            raise KeyRegistryError(f"role {role!r}: one of {', '.join(ROLES)}")
        if not name.strip() or len(name) > 100:
            raise KeyRegistryError("a key's name is 1 to 100 characters")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        expires = None
        if expires_days is not None:
            expires = (datetime.now(UTC) + timedelta(days=expires_days)).isoformat(
                timespec="seconds"
            )
        record = KeyRecord(key_id, name.strip(), role, digest_of(secret), now_text(), expires)
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO keys (id, name, role, digest, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.name, record.role, record.digest, record.created_at, expires),
            )
        return f"{PREFIX}{key_id}.{secret}", record

    def get(self, key_id: str) -> KeyRecord | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT id, name, role, digest, created_at, expires_at, revoked_at FROM keys "
                "WHERE id = ?",
                (key_id,),
            ).fetchone()
        return KeyRecord(*row) if row else None

    def records(self) -> list[KeyRecord]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT id, name, role, digest, created_at, expires_at, revoked_at FROM keys "
                "ORDER BY created_at, id"
            ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke(self, key_id: str) -> KeyRecord:
        with self._connect() as conn:
            done = conn.execute(
                "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now_text(), key_id),
            )
        record = self.get(key_id)
        if record is None:
            raise KeyRegistryError(f"no key {key_id!r} (`convirt keys list` shows them)")
        if done.rowcount == 0:
            raise KeyRegistryError(f"key {key_id} was already revoked at {record.revoked_at}")
        return record
