"""The audit trail: who searched and viewed what, and when (CONVIRT_AUDIT_LOG, `convirt audit`).

One JSON object a line, appended, never rewritten: seq, time (UTC), user ("key:<id>",
"proxy:<name>" or "anonymous") with the key's name and role, client address, method, endpoint
(the route template), status, the query, the image ids viewed and the result ids returned.

- **Queries** are kept as a salted hash by default (CONVIRT_AUDIT_QUERIES=hash): HMAC-SHA256 with
  a secret generated once and kept beside the log (LOG.salt, owner-only), never in it. The same
  query gives the same hash, so `convirt audit --query TEXT` still finds who asked it, but the log
  itself holds no report language. `text` keeps the text. An uploaded image is only ever hashed.
- **Tamper evident**: each entry holds the SHA-256 of the previous one (`prev`) and of itself
  (`hash`), and LOG.head holds the last seq and hash. `convirt audit verify` recomputes the chain
  and names the first line that was edited, deleted or inserted, or the end cut off. Someone who
  can rewrite the whole file and its head can forge a new chain: ship the lines off the host
  (syslog, WORM storage) where that matters.
- **What is recorded**: searches (text, image, refine, similar) with the ids they returned,
  explanations and image files by id, the admin API. Not thumbnails: every thumbnail the page
  shows is of a result id already recorded with its search (one entry per thumbnail would be a
  hundred per page). Requests refused before identification (401, 429) are not recorded either,
  so nobody without a key can grow the log.
- **Fail closed**: a request whose entry cannot be written gets a 503, not an unrecorded answer.
- **Durable**: each line is on disk (fsync) before its answer goes out, then LOG.head, so a power
  cut can lose neither an answered request's line nor leave a head ahead of the log (which verify
  would report as a cut-off end). It costs two or three fsyncs a request (docs/benchmarks.md).

Route handlers hold no audit code: deps.audited (a dependency of the routers) opens a record for
the request, the Searcher notes the query and results into it (note_query, note_results), and the
record is written when the handler returns.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64  # `prev` of the first entry
QUERY_MODES = ("hash", "text")
TAIL_STEP = 64 * 1024


class AuditError(RuntimeError):
    pass


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry without its own hash (its `prev` included: that makes the chain)."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


# -- the record of one request, filled in as it is served ---------------------------------------


@dataclass
class AuditRecord:
    user: str
    name: str | None
    role: str | None
    client: str | None
    method: str
    endpoint: str
    time: str = field(default_factory=utc_now)
    status: int = 200
    query: str | None = None  # in memory only: written as a hash unless CONVIRT_AUDIT_QUERIES=text
    upload: bytes | None = None  # an uploaded image, in memory only: written as a hash
    images: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)


_current: ContextVar[AuditRecord | None] = ContextVar("convirt_audit_record", default=None)


def begin(record: AuditRecord) -> Any:
    """Make `record` the current request's (returns the token for end())."""
    return _current.set(record)


def end(token: Any) -> None:
    try:
        _current.reset(token)
    except ValueError:  # not the context it was set in
        _current.set(None)


def note_query(text: str | None) -> None:
    record = _current.get()
    if record is not None and text is not None:
        record.query = text


def note_upload(data: bytes) -> None:
    """An uploaded image: hashed when the record is written (in a worker thread, not here)."""
    record = _current.get()
    if record is not None:
        record.upload = data


def note_image(image_id: int | str | None) -> None:
    record = _current.get()
    if record is not None and image_id is not None and str(image_id) not in record.images:
        record.images.append(str(image_id))


def note_results(results: Iterable[Any]) -> None:
    """The ids of search results (schemas.SearchResult), their groups' other members included."""
    record = _current.get()
    if record is None:
        return
    for result in results:
        record.results.append(str(result.id))
        if result.group is not None:
            record.results.extend(str(member.id) for member in result.group.more)


# -- the log file ---------------------------------------------------------------------------------


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def salt_path(path: Path) -> Path:
    return path.with_name(path.name + ".salt")


def read_salt(path: Path, create: bool = False) -> bytes | None:
    """The log's secret salt (LOG.salt), made on first use when `create`."""
    salt_file = salt_path(path)
    if create and not salt_file.exists():
        salt_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    try:
        return bytes.fromhex(salt_file.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise AuditError(f"{salt_file} is not a salt (hex digits): {err}") from err


def query_hash(salt: bytes, query: str | bytes) -> str:
    data = query.encode("utf-8") if isinstance(query, str) else query
    return hmac.new(salt, data, hashlib.sha256).hexdigest()


class AuditLog:
    """Appends chained entries. Thread-safe; several processes may share one log (flock)."""

    def __init__(self, path: Path, queries: str = "hash"):
        if queries not in QUERY_MODES:
            raise AuditError(f"queries: one of {QUERY_MODES}")
        self.path = Path(path)
        self.queries = queries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        salt = read_salt(self.path, create=True)
        assert salt is not None
        self.salt = salt
        self.lock = threading.Lock()
        self.tail: tuple[int, int, str] | None = None  # (file size, seq, hash) after our last write
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        with open(self.path, "rb") as f:
            self._last(f.fileno())  # a damaged end is found now, at startup, not per request

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
            "results": record.results,
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
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                seq, prev = self._last(fd)
                entry = {**fields, "seq": seq + 1, "prev": prev}
                entry["hash"] = entry_hash(entry)
                line = canonical(entry) + b"\n"
                written = os.write(fd, line)  # one write on an O_APPEND descriptor: a whole line
                if written != len(line):
                    raise AuditError(f"{self.path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)  # the line first: the head must never be ahead of the log
                self.tail = (os.fstat(fd).st_size, entry["seq"], entry["hash"])
                write_head(self.path, entry["seq"], entry["hash"])
            finally:
                os.close(fd)  # and the lock with it
        return entry

    def _last(self, fd: int) -> tuple[int, str]:
        """(seq, hash) of the last entry; GENESIS for an empty log."""
        size = os.fstat(fd).st_size
        if self.tail is not None and self.tail[0] == size:
            return self.tail[1], self.tail[2]
        if size == 0:
            return 0, GENESIS
        line = last_line(fd, size)
        try:
            entry = json.loads(line)
            seq, hash_ = int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError) as err:
            raise AuditError(
                f"the last line of the audit log {self.path} is damaged ({err}); run `convirt "
                "audit verify`, move the log aside (keep it) and start a new one"
            ) from err
        self.tail = (size, seq, hash_)
        return seq, hash_


def last_line(fd: int, size: int) -> bytes:
    """The last line of a file that ends with a newline, without the newline."""
    if os.pread(fd, 1, size - 1) != b"\n":
        raise AuditError("the audit log does not end with a whole line (cut short)")
    start, chunk = size - 1, b""  # chunk: bytes [start, size - 1)
    while start > 0:
        step = min(TAIL_STEP, start)
        start -= step
        chunk = os.pread(fd, step, start) + chunk
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return chunk[cut + 1 :]
    return chunk


def write_head(path: Path, seq: int, hash_: str) -> None:
    """LOG.head: the last seq and hash, replaced atomically, so a cut-off end is detected."""
    head = head_path(path)
    temporary = head.with_name(head.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical({"seq": seq, "hash": hash_}) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, head)
    directory = os.open(head.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


# -- reading and verifying -----------------------------------------------------------------------


def read_entries(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                entry = json.loads(raw)
            except ValueError as err:
                raise AuditError(f"{path} line {number} is not JSON: {err}") from err
            if isinstance(entry, dict):
                yield entry


@dataclass(frozen=True)
class Verdict:
    entries: int
    problem: str | None = None
    line: int | None = None  # the first bad line, 1-based

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(path: Path) -> Verdict:
    """Recompute the chain: the first line edited, deleted, inserted or cut off, if any."""
    prev, seq = GENESIS, 0
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; read line by line)
    except FileNotFoundError:
        return Verdict(0, f"no audit log at {path}")
    with f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return Verdict(seq, "the line is cut short (no newline)", number)
            try:
                entry = json.loads(raw)
                claimed = entry["hash"]
            except (ValueError, KeyError, TypeError):
                return Verdict(seq, "the line is not an audit entry (not JSON, or no hash)", number)
            if entry_hash(entry) != claimed:
                return Verdict(seq, "the line does not match its hash: it was edited", number)
            if entry.get("prev") != prev:
                return Verdict(
                    seq,
                    "the line does not follow the one before it: a line before it was deleted, "
                    "inserted or edited",
                    number,
                )
            if entry.get("seq") != seq + 1:
                return Verdict(
                    seq, f"sequence number {entry.get('seq')}, expected {seq + 1}", number
                )
            prev, seq = claimed, seq + 1
    try:
        head = json.loads(head_path(path).read_text())
    except FileNotFoundError:
        if seq == 0:
            return Verdict(0)
        return Verdict(seq, f"{head_path(path).name} is missing: the end cannot be checked", seq)
    except ValueError:
        return Verdict(seq, f"{head_path(path).name} is not JSON", seq)
    if head.get("seq") != seq or head.get("hash") != prev:
        if isinstance(head.get("seq"), int) and head["seq"] > seq:
            return Verdict(
                seq,
                f"the log ends at entry {seq} but {head_path(path).name} says {head['seq']}: "
                "lines were deleted from the end",
                seq + 1,
            )
        return Verdict(seq, f"{head_path(path).name} does not match the last entry", max(seq, 1))
    return Verdict(seq)


# -- filters for `convirt audit` -----------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """An ISO date or date-time; without a zone, UTC."""
    when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filters:
    user: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    image: str | None = None
    endpoint: str | None = None
    query_hash: str | None = None  # of the --query text, with the log's salt
    query_text: str | None = None

    def keep(self, entry: dict[str, Any]) -> bool:
        if self.user is not None and self.user not in (
            entry.get("user"),
            entry.get("name"),
            str(entry.get("user", "")).partition(":")[2],
        ):
            return False
        if self.since is not None or self.until is not None:
            when = parse_time(str(entry.get("time")))
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when > self.until:
                return False
        if self.image is not None and self.image not in (
            list(entry.get("images") or []) + list(entry.get("results") or [])
        ):
            return False
        if self.endpoint is not None and self.endpoint not in str(entry.get("endpoint", "")):
            return False
        if self.query_hash is not None or self.query_text is not None:
            return (self.query_hash is not None and entry.get("query_hash") == self.query_hash) or (
                self.query_text is not None and entry.get("query_text") == self.query_text
            )
        return True
