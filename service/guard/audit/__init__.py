"""The audit trail: who searched and viewed what, and when (CONVIRT_AUDIT_LOG, `convirt audit`).

One JSON object a line, appended, never rewritten: seq, time (UTC), user ("key:<id>",
"proxy:<name>" or "anonymous") with the key's name and role, client address, method, endpoint
(the route template), status, the query, the image ids viewed and the result ids returned (a
large answer: its first ids packed, with their count and digest; record.py). docs/audit.md says
what it guarantees and what it does not.

- **Queries** are kept as a salted hash by default (CONVIRT_AUDIT_QUERIES=hash): HMAC-SHA256 with
  a secret generated once and kept beside the log (LOG.salt, owner-only), never in it. `text`
  keeps the text. An uploaded image is only ever hashed.
- **Tamper evident** (chain.py): each entry holds the previous entry's hash (`prev`) and its own
  (`hash`), an HMAC-SHA256 under a key kept away from the log (CONVIRT_AUDIT_KEY_FILE; by default
  LOG.key beside it, which only guards against those who cannot read that file). LOG.head holds
  the last seq and hash with a MAC; the anchor (CONVIRT_AUDIT_ANCHOR, on another disk) holds them
  too, so `convirt audit verify` finds an emptied or cut log.
- **Recovers by itself** (store.py): a line cut short by a full disk is sealed by the next write
  with a recovery entry; a free-space reserve (CONVIRT_AUDIT_MIN_FREE_MB) refuses requests
  before the disk is full; `convirt audit rotate` (or CONVIRT_AUDIT_ROTATE_MB) starts a new file
  whose first entry is chained to the old file's last.
- **What is recorded**: searches (text, image, refine, similar) with the ids they returned,
  explanations and image files by id, the admin API. Not thumbnails: every thumbnail the page
  shows is of a result id already recorded with its search. Requests refused before
  identification (401, 429) are not recorded either, so nobody without a key can grow the log.
- **Fail closed**: a request whose entry cannot be written gets a 503, not an unrecorded answer.
- **Durable**: each line is on disk (fsync) before its answer goes out, then LOG.head, so a power
  cut can lose neither an answered request's line nor leave a head ahead of the log.

deps.audited (a dependency of the routers) opens a record for the request, the route handler
notes the query and the results the search core gave it into it (note_query, note_upload,
note_image, note_results), and the record is written when the handler returns.
"""

from .chain import (
    GENESIS,
    AuditError,
    ChainKey,
    canonical,
    entry_hash,
    head_path,
    key_path,
    load_key,
    plain_hash,
    query_hash,
    read_anchor,
    read_salt,
    salt_path,
    write_head,
)
from .filters import Filters, parse_time
from .record import (
    AuditRecord,
    begin,
    end,
    note_image,
    note_query,
    note_results,
    note_upload,
    result_count,
    result_fields,
    result_ids,
    utc_now,
)
from .store import QUERY_MODES, AuditFull, AuditLog, last_line, rotated_path
from .verify import Verdict, log_files, read_entries, verify

__all__ = [
    "GENESIS",
    "QUERY_MODES",
    "AuditError",
    "AuditFull",
    "AuditLog",
    "AuditRecord",
    "ChainKey",
    "Filters",
    "Verdict",
    "begin",
    "canonical",
    "end",
    "entry_hash",
    "head_path",
    "key_path",
    "last_line",
    "load_key",
    "log_files",
    "note_image",
    "note_query",
    "note_results",
    "note_upload",
    "parse_time",
    "plain_hash",
    "query_hash",
    "read_anchor",
    "read_entries",
    "read_salt",
    "result_count",
    "result_fields",
    "result_ids",
    "rotated_path",
    "salt_path",
    "utc_now",
    "verify",
    "write_head",
]
