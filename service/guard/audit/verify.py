"""Reading the log back: every file of it in order (rotated ones first), and verifying the chain.

`verify` walks LOG.<seq> files (rotated, oldest first) and then LOG, recomputing each entry's hash
(HMAC under the chain key from its `keyed_from` on, plain SHA-256 before) and link, then checks
LOG.head (and its MAC) and the anchor. A line cut short and sealed by the next write (a full disk)
is reported as a recovered torn write, not as tampering; so is a torn last line not sealed yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chain import (
    GENESIS,
    AuditError,
    ChainKey,
    head_path,
    key_path,
    load_key,
    plain_hash,
    read_anchor,
    sha256_hex,
)
from .store import ROTATED, TORN


def log_files(path: Path) -> list[Path]:
    """The rotated files of the log (LOG.<last seq>), oldest first, then LOG itself."""
    rotated = [
        candidate
        for candidate in path.parent.glob(path.name + ".*")
        if candidate.name[len(path.name) + 1 :].isdigit()
    ]
    rotated.sort(key=lambda candidate: int(candidate.name[len(path.name) + 1 :]))
    return rotated + ([path] if path.exists() else [])


def lines_of(file: Path) -> Iterator[tuple[int, bytes, bytes | None]]:
    """(line number, line, the next line or None) of a file."""
    with open(file, "rb") as f:
        previous: bytes | None = None
        number = 0
        for raw in f:
            if previous is not None:
                yield number, previous, raw
            number, previous = number + 1, raw
        if previous is not None:
            yield number, previous, None


def parse(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def seals(raw: bytes, following: bytes | None) -> bool:
    """Whether the next line is the entry that sealed `raw` as a torn write."""
    if following is None or not raw.endswith(b"\n"):
        return False
    entry = parse(following)
    fragment = raw[:-1]
    return (
        entry is not None
        and entry.get("event") == TORN
        and entry.get("torn_sha256") == sha256_hex(fragment)
        and entry.get("torn_bytes") == len(fragment)
    )


def read_entries(path: Path) -> Iterator[dict[str, Any]]:
    """The request entries of the log, rotated files included (not the bookkeeping events)."""
    for file in log_files(path):
        for number, raw, following in lines_of(file):
            entry = parse(raw)
            if entry is None:
                if seals(raw, following) or (following is None and not raw.endswith(b"\n")):
                    continue  # a torn write, sealed or not yet
                raise AuditError(f"{file} line {number} is not JSON")
            if "event" not in entry:
                yield entry


@dataclass
class Verdict:
    entries: int
    problem: str | None = None
    line: int | None = None  # the first bad line, 1-based
    file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


class Walk:
    """The state of one verification: where the chain is, what was seen."""

    def __init__(self, key: ChainKey | None, anchor_seq: int | None):
        self.key = key
        self.seq, self.prev = 0, GENESIS
        self.entries = 0
        self.first_seq: int | None = None
        self.anchor_seq = anchor_seq
        self.anchored_hash: str | None = None
        self.notes: list[str] = []

    def expected_hash(self, entry: dict[str, Any], seq: int) -> str | None:
        if self.key is None:
            return plain_hash(entry)
        return self.key.hash(entry, seq)

    def step(self, entry: dict[str, Any], file: Path, number: int) -> str | None:
        """Check one entry; the problem, if any."""
        claimed = entry.get("hash")
        seq = entry.get("seq")
        if self.first_seq is None:  # where the walk starts: the beginning, or after retention
            if not isinstance(seq, int) or seq < 1:
                return f"sequence number {seq!r} is not a positive integer"
            if seq != 1 or entry.get("prev") != GENESIS:
                if entry.get("event") != ROTATED:
                    return "the log does not start at its first entry: lines were deleted"
                self.notes.append(
                    f"starts at entry {seq} ({file.name}): older files were removed (retention)"
                )
                self.seq, self.prev = seq - 1, str(entry.get("prev"))
            self.first_seq = seq
        if self.expected_hash(entry, self.seq + 1) != claimed:
            if self.key is not None and self.seq + 1 >= self.key.keyed_from:
                return (
                    "the line does not match its keyed hash (HMAC): it was edited, or written "
                    "by someone without the chain key"
                )
            return "the line does not match its hash: it was edited"
        if entry.get("prev") != self.prev:
            return (
                "the line does not follow the one before it: a line before it was deleted, "
                "inserted or edited"
            )
        if seq != self.seq + 1:
            return f"sequence number {seq}, expected {self.seq + 1}"
        self.seq, self.prev, self.entries = self.seq + 1, str(claimed), self.entries + 1
        if self.seq == self.anchor_seq:
            self.anchored_hash = self.prev
        if entry.get("event") == TORN:
            self.notes.append(
                f"line {number - 1} of {file.name}: a recovered torn write (a short write, e.g. "
                f"a full disk) of {entry.get('torn_bytes')} bytes, sealed by entry {seq}"
            )
        return None


def verify(
    path: Path,
    key_file: Path | None = None,
    anchor: Path | None = None,
    legacy: bool = False,
) -> Verdict:
    """Recompute the chain of every file of the log: the first line edited, deleted, inserted or
    cut off, if any. The key: `key_file`, else LOG.key; `legacy`: none, a log from before the
    keyed chain (plain SHA-256)."""
    files = log_files(path)
    if not files:
        return Verdict(0, f"no audit log at {path}")
    try:
        key = None if legacy else load_key(key_path(path, key_file))
        anchored = read_anchor(anchor) if anchor is not None else None
    except AuditError as err:
        return Verdict(0, str(err))
    walk = Walk(key, anchored[0] if anchored else None)
    for index, file in enumerate(files):
        current = index == len(files) - 1 and file == path
        for number, raw, following in lines_of(file):
            if seals(raw, following):
                continue  # checked as the entry that follows
            if not raw.endswith(b"\n"):
                if current:
                    walk.notes.append(
                        f"line {number} is a torn write not sealed yet (a short write, e.g. a "
                        "full disk): the next write seals it"
                    )
                    continue
                return bad(walk, "the line is cut short (no newline)", number, file)
            entry = parse(raw)
            if entry is None or "hash" not in entry:
                return bad(
                    walk, "the line is not an audit entry (not JSON, or no hash)", number, file
                )
            if key is None and not legacy:
                return bad(
                    walk,
                    "no chain key to check this log with: give --key-file (or set "
                    "CONVIRT_AUDIT_KEY_FILE); a log written before the keyed chain (no key "
                    "file was ever made) verifies with --legacy, as a plain SHA-256 chain",
                    number,
                    file,
                )
            problem = walk.step(entry, file, number)
            if problem:
                return bad(walk, problem, number, file)
        if file != path and walk.seq != int(file.name[len(path.name) + 1 :]):
            return bad(walk, f"the rotated file ends at entry {walk.seq}, not as named", None, file)
    problem = check_head(path, walk) or check_anchor(anchor, anchored, walk)
    if problem:
        return bad(walk, problem, max(walk.seq, 1), path)
    if key is None:
        walk.notes.append(
            "verified as a plain SHA-256 chain (--legacy): anyone who could write the log could "
            "have rewritten it"
        )
    elif walk.first_seq is not None and walk.first_seq < key.keyed_from:
        walk.notes.append(
            f"entries before {key.keyed_from} predate the keyed chain (plain SHA-256): anyone "
            "who could write the log could have rewritten them"
        )
    if anchor is None:
        walk.notes.append(
            "no anchor (CONVIRT_AUDIT_ANCHOR): an emptied log, or one cut at the end with an old "
            "head put back, cannot be told from an intact one"
        )
    return Verdict(walk.entries, notes=walk.notes)


def bad(walk: Walk, problem: str, line: int | None, file: Path) -> Verdict:
    return Verdict(walk.entries, problem, line, file, walk.notes)


def check_head(path: Path, walk: Walk) -> str | None:
    head_file = head_path(path)
    try:
        head = json.loads(head_file.read_text())
    except FileNotFoundError:
        if walk.seq == 0:
            return None
        return f"{head_file.name} is missing: the end cannot be checked"
    except ValueError:
        return f"{head_file.name} is not JSON"
    if not isinstance(head, dict):
        return f"{head_file.name} is not a head record"
    seq = head.get("seq")
    key = walk.key
    signed = key is None or not isinstance(seq, int) or seq < key.keyed_from
    if not signed and key is not None:
        signed = head.get("mac") == key.head_mac(seq, str(head.get("hash")))
    if not signed:
        return (
            f"{head_file.name} is not signed with the chain key: it was rewritten (lines "
            "deleted from the end and the head forged?)"
        )
    if seq != walk.seq or head.get("hash") != walk.prev:
        if isinstance(seq, int) and seq > walk.seq:
            return (
                f"the log ends at entry {walk.seq} but {head_file.name} says {seq}: lines were "
                "deleted from the end"
            )
        return f"{head_file.name} does not match the last entry"
    return None


def check_anchor(anchor: Path | None, anchored: tuple[int, str] | None, walk: Walk) -> str | None:
    if anchor is None:
        return None
    if anchored is None:
        if walk.seq == 0:
            return None
        return f"the anchor {anchor} is missing: it is written with every entry"
    seq, hash_ = anchored
    if seq > walk.seq:
        return (
            f"the log ends at entry {walk.seq} but the anchor {anchor} says {seq}: the log was "
            "emptied or lines were deleted from the end"
        )
    if walk.first_seq is not None and seq < walk.first_seq:
        walk.notes.append(f"the anchor names entry {seq}, before the oldest file kept")
        return None
    if walk.anchored_hash != hash_:
        return f"entry {seq} does not match the anchor {anchor}: the log was rewritten"
    return None
