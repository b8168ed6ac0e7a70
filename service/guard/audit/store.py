"""Appending to the audit log: one locked, fsynced line per request, and how the log recovers.

Why the recovery: a short write (a full disk) leaves half a line at the end; before this, every
later write and every restart refused the log, a permanent outage after the disk was freed. Now
the next write (or the start) seals such a torn tail: it ends the fragment with a newline and
appends a `torn_write_sealed` entry naming its length and SHA-256, chained to the last whole entry,
so verify reports a recovered torn write, not tampering. A reserve of free space
(CONVIRT_AUDIT_MIN_FREE_MB) refuses requests before the disk is full, with a message saying so.

Why rotation here: the file a running service appends to can be rotated under it (`convirt audit
rotate`, or past CONVIRT_AUDIT_ROTATE_MB): the old file is hard-linked to LOG.<last seq> and a new
file holding one `rotated` entry (chained to the old file's last hash) replaces LOG atomically.
A writer that waited for the lock on the old file sees the path now names another file and
reopens it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from index.layout import fsync_dir

from .chain import (
    GENESIS,
    AuditError,
    ChainKey,
    canonical,
    create_key,
    key_path,
    load_key,
    query_hash,
    read_salt,
    sha256_hex,
    write_anchor,
    write_head,
)
from .record import DEFAULT_MAX_IDS, AuditRecord, result_fields, utc_now

QUERY_MODES = ("hash", "text")
TAIL_STEP = 64 * 1024
MB = 1024 * 1024
TORN = "torn_write_sealed"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
ROTATED = "rotated"

log = logging.getLogger("convirt.audit")


class AuditFull(AuditError):
    """The audit log's disk is full (`reason` disk_full) or under its reserve (disk_reserve)."""

    def __init__(self, message: str, reason: str = "disk_full"):
        super().__init__(message)
        self.reason = reason

    public = (
        "not answered: the audit log's disk is nearly full, so this request could not be "
        "recorded; the operator must free space or rotate the log (docs/audit.md)"
    )


def rotated_path(path: Path, last_seq: int) -> Path:
    return path.with_name(f"{path.name}.{last_seq:012d}")


class AuditLog:
    """Appends chained entries. Thread-safe; several processes may share one log (flock)."""

    def __init__(
        self,
        path: Path,
        queries: str = "hash",
        *,
        key_file: Path | None = None,
        anchor: Path | None = None,
        min_free_bytes: int = 0,
        rotate_bytes: int = 0,
        max_result_ids: int = DEFAULT_MAX_IDS,
        observer: Callable[[str], None] | None = None,
    ):
        if queries not in QUERY_MODES:
            raise AuditError(f"queries: one of {QUERY_MODES}")
        self.path = Path(path)
        self.queries = queries
        self.anchor = Path(anchor) if anchor is not None else None
        self.min_free_bytes = min_free_bytes
        self.rotate_bytes = rotate_bytes
        self.max_result_ids = max_result_ids
        self.observer = observer or (lambda event: None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        salt = read_salt(self.path, create=True)
        assert salt is not None
        self.salt = salt
        self.lock = threading.Lock()
        self.tail: tuple[int, int, int, str] | None = None  # (inode, size, seq, hash)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        self.key = self._key(key_path(self.path, key_file))
        self.recover()  # a damaged end is found now, at startup, not per request

    @classmethod
    def from_settings(
        cls, settings: Any, observer: Callable[[str], None] | None = None
    ) -> AuditLog:
        """The log a service.settings.Settings describes (its audit_log must be set)."""
        return cls(
            settings.audit_log,
            settings.audit_queries,
            key_file=settings.audit_key_file,
            anchor=settings.audit_anchor,
            min_free_bytes=int(settings.audit_min_free_mb * MB),
            rotate_bytes=int(settings.audit_rotate_mb * MB),
            max_result_ids=settings.audit_max_result_ids,
            observer=observer,
        )

    def _key(self, path: Path) -> ChainKey:
        key = load_key(path)
        if key is None:  # first start (or a log from before the keyed chain): key from here on
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                whole = size - len(torn_fragment(f.fileno(), size))
                last = last_entry(f.fileno(), whole, self.path)
            key = create_key(path, (last[0] if last else 0) + 1)
            log.info("audit chain key made at %s (keyed from entry %d)", path, key.keyed_from)
        return key

    # -- writing ---------------------------------------------------------------------------------

    def write(self, record: AuditRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "time": record.time,
            "user": record.user,
            "name": record.name,
            "role": record.role,
            "client": record.client,
            "method": record.method,
            "endpoint": record.endpoint,
            "status": record.status,
            "images": record.images,
            **result_fields(record.results, self.max_result_ids),
        }
        if record.query is not None:
            if self.queries == "text":
                fields["query_text"] = record.query
            else:
                fields["query_hash"] = query_hash(self.salt, record.query)
        if record.upload is not None:
            fields["upload_hash"] = query_hash(self.salt, record.upload)
        return self.append(fields)

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            fd = self._open_locked()
            try:
                self._check_reserve()
                seq, prev = self._last(fd)
                entry = self._write_entry(fd, fields, seq, prev)
                if self.rotate_bytes and os.fstat(fd).st_size >= self.rotate_bytes:
                    self._rotate_quietly(entry)
            except AuditFull as err:
                self.observer(err.reason)
                raise
            except OSError as err:
                if err.errno not in DISK_FULL:
                    self.observer("write_failed")
                    raise
                self.observer("disk_full")
                raise AuditFull(f"{self.path}: {err.strerror}") from err
            except AuditError:
                self.observer("write_failed")
                raise
            finally:
                os.close(fd)  # and the lock with it
        return entry

    def recover(self) -> None:
        """Seal a torn tail now, and bring the anchor up to date. A disk still full is no
        reason to refuse to start: requests get 503 until it is freed, then all goes on."""
        with self.lock:
            fd = self._open_locked()
            try:
                seq, hash_ = self._last(fd)
                if seq and self.anchor is not None:
                    write_anchor(self.anchor, seq, hash_, utc_now())
            except AuditFull as err:
                log.warning("audit log %s: cannot recover yet: %s", self.path, err)
            except OSError as err:
                if err.errno not in DISK_FULL:
                    raise
                log.warning("audit log %s: cannot recover yet, its disk is full", self.path)
            finally:
                os.close(fd)

    def rotate(self) -> Path:
        """Start a new file now (`convirt audit rotate`): returns the old file's new name."""
        with self.lock:
            fd = self._open_locked()
            try:
                seq, hash_ = self._last(fd)
                if seq == 0:
                    raise AuditError(f"{self.path} is empty: nothing to rotate")
                return self._rotate_locked(seq, hash_)
            finally:
                os.close(fd)

    def free_bytes(self) -> float:
        """Free bytes on the log's disk (for unprivileged users)."""
        stats = os.statvfs(self.path.parent)
        return float(stats.f_bavail * stats.f_frsize)

    def _check_reserve(self) -> None:
        if self.min_free_bytes <= 0:
            return
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise AuditFull(
                f"the audit log's disk ({self.path.parent}) has {free / MB:.1f} MB free, under "
                f"the reserve of {self.min_free_bytes / MB:.1f} MB (CONVIRT_AUDIT_MIN_FREE_MB): "
                "requests are refused until space is freed or the log rotated (docs/audit.md)",
                "disk_reserve",
            )

    def _open_locked(self) -> int:
        """The log, opened and locked; reopened when it was rotated while we waited."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            fcntl.flock(fd, fcntl.LOCK_EX)
            opened = os.fstat(fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == opened.st_ino:
                return fd
            os.close(fd)

    def _write_entry(self, fd: int, fields: dict[str, Any], seq: int, prev: str) -> dict[str, Any]:
        entry = {**fields, "seq": seq + 1, "prev": prev}
        entry["hash"] = self.key.hash(entry, seq + 1)
        line = canonical(entry) + b"\n"
        written = os.write(fd, line)  # one write on an O_APPEND descriptor: a whole line
        if written != len(line):  # a full disk: the fragment is sealed by the next write
            raise AuditFull(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)  # the line first: the head must never be ahead of the log
        self._written(fd, entry)
        return entry

    def _written(self, fd: int, entry: dict[str, Any]) -> None:
        stat = os.fstat(fd)
        self.tail = (stat.st_ino, stat.st_size, entry["seq"], entry["hash"])
        write_head(self.path, entry["seq"], entry["hash"], self.key)
        if self.anchor is not None:
            write_anchor(self.anchor, entry["seq"], entry["hash"], entry.get("time", utc_now()))

    def _last(self, fd: int) -> tuple[int, str]:
        """(seq, hash) of the last entry (GENESIS for an empty log), a torn tail sealed first."""
        stat = os.fstat(fd)
        if self.tail is not None and self.tail[:2] == (stat.st_ino, stat.st_size):
            return self.tail[2], self.tail[3]
        if stat.st_size == 0:
            return 0, GENESIS
        fragment = torn_fragment(fd, stat.st_size)
        last = last_entry(fd, stat.st_size - len(fragment), self.path)
        seq, hash_ = last if last is not None else (0, GENESIS)
        if fragment:
            return self._seal(fd, fragment, seq, hash_)
        self.tail = (stat.st_ino, stat.st_size, seq, hash_)
        return seq, hash_

    def _seal(self, fd: int, fragment: bytes, seq: int, prev: str) -> tuple[int, str]:
        """End a torn line and record it, in one write; a short one is undone (we hold the lock)."""
        entry: dict[str, Any] = {
            "event": TORN,
            "time": utc_now(),
            "torn_bytes": len(fragment),
            "torn_sha256": sha256_hex(fragment),
            "seq": seq + 1,
            "prev": prev,
        }
        entry["hash"] = self.key.hash(entry, seq + 1)
        data = b"\n" + canonical(entry) + b"\n"
        before = os.fstat(fd).st_size
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, before)  # only our own bytes: the fragment stays, sealed next time
            raise AuditFull(f"{self.path}: short write sealing a torn line, disk still full")
        os.fsync(fd)
        self._written(fd, entry)
        self.observer("torn_write_sealed")
        log.warning(
            "audit log %s: a torn line of %d bytes (a short write, e.g. a full disk) was sealed "
            "by entry %d",
            self.path,
            len(fragment),
            entry["seq"],
        )
        return entry["seq"], entry["hash"]

    def _rotate_quietly(self, last: dict[str, Any]) -> None:
        try:
            self._rotate_locked(last["seq"], last["hash"])
        except (AuditError, OSError) as err:  # the request's own line is written: not its fault
            log.warning(
                "audit log %s: rotation failed, retried on the next write: %s", self.path, err
            )

    def _rotate_locked(self, seq: int, hash_: str) -> Path:
        old = rotated_path(self.path, seq)
        os.link(self.path, old)  # the same file under its final name; LOG never goes missing
        entry: dict[str, Any] = {"event": ROTATED, "time": utc_now(), "previous": old.name}
        entry.update(seq=seq + 1, prev=hash_)
        entry["hash"] = self.key.hash(entry, seq + 1)
        fresh = self.path.with_name(self.path.name + ".rotating")
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        replaced = False
        try:
            line = canonical(entry) + b"\n"
            if os.write(fd, line) != len(line):
                raise AuditFull(f"{fresh}: short write")
            os.fsync(fd)
            os.replace(fresh, self.path)
            replaced = True
            fsync_dir(self.path.parent)
            self._written(fd, entry)
        except BaseException:
            if not replaced:  # undone: LOG is still the whole old file
                os.unlink(old)
                fresh.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        log.info("audit log rotated: %s, then a new %s", old.name, self.path.name)
        return old


# -- reading the end of a log --------------------------------------------------------------------


def torn_fragment(fd: int, size: int) -> bytes:
    """The bytes after the last newline: a line cut short (empty when the log ends whole)."""
    start, chunk = size, b""
    while start > 0:
        step = min(TAIL_STEP, start)
        start -= step
        chunk = os.pread(fd, step, start) + chunk
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return chunk[cut + 1 :]
    return chunk


def last_line(fd: int, size: int) -> bytes:
    """The last line of the first `size` bytes, which end with a newline, without it."""
    return torn_fragment(fd, size - 1)


def last_entry(fd: int, size: int, path: Path) -> tuple[int, str] | None:
    """(seq, hash) of the last whole line of the first `size` bytes; None when there is none."""
    if size == 0:
        return None
    try:
        entry = json.loads(last_line(fd, size))
        return int(entry["seq"]), str(entry["hash"])
    except (ValueError, KeyError, TypeError) as err:
        raise AuditError(
            f"the last line of the audit log {path} is damaged ({err}); run `convirt audit "
            "verify`, move the log aside (keep it) and start a new one"
        ) from err
