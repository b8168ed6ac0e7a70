"""Serving a dicomweb:// row: its instance fetched from the PACS once, kept by content hash in
$CONVIRT_CACHE_DIR/dicomweb. The service reaches it through index.sources.remote only."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convirt.paths import cache_dir

from .download import retrieve
from .http import BadAnswer, DicomwebError, network_errors, unreachable
from .listing import Instance
from .pacs import DEFAULT_DEADLINE_S, KIND, NAME_PATTERN, SCHEME, Pacs

SERVE_TIMEOUT_S = 10.0


def copy_path(row: Mapping[str, Any]) -> Path:
    """Where the local copy of a row is kept: $CONVIRT_CACHE_DIR/dicomweb/SHA.dcm."""
    return cache_dir() / KIND / f"{row['sha256']}.dcm"


def cached_copy(row: Mapping[str, Any]) -> Path | None:
    """The local copy fetch_one keeps of a row, of the indexed size, or None."""
    target = copy_path(row)
    try:
        return target if target.stat().st_size == row["size_bytes"] else None
    except OSError:
        return None


def server_of(row: Mapping[str, Any]) -> str:
    """The base URL fetch_one fetches a row from: its recorded source, else the host in its name."""
    source = row.get("source") or ""
    if source.startswith(("http://", "https://")):
        return source.rstrip("/")
    where = row["path"].removeprefix(SCHEME).split("/studies/", 1)[0]
    return f"http://{where}"


def server_failed(err: BaseException) -> bool:
    """Whether a fetch failed for the whole PACS (no connection, a timeout, a 5xx), not for one
    instance (a 404, other content than was indexed)."""
    import requests

    cause = err.__cause__ or err
    if isinstance(cause, requests.HTTPError):
        response = cause.response
        return response is None or response.status_code >= 500
    return isinstance(cause, requests.RequestException | OSError | TimeoutError)


def fetch_one(row: dict[str, Any], *, deadline_s: float | None = None) -> Path:
    """A local copy of an indexed instance, fetched from its PACS (kept by content hash, so it is
    fetched once: copy_path), in at most `deadline_s` seconds (default: DEFAULT_DEADLINE_S) and
    DEFAULT_MAX_INSTANCE_BYTES. DicomwebError when the PACS cannot give it, answers badly or too
    slowly, or gives other bytes than were indexed."""
    match = NAME_PATTERN.match(row["path"])
    if match is None:
        raise DicomwebError(f"{row['path']} is not a DICOMweb instance name")
    sha = row["sha256"]
    target = copy_path(row)
    if target.is_file() and target.stat().st_size == row["size_bytes"]:
        return target
    folder = target.parent
    base = row.get("source") or ""
    if not base.startswith(("http://", "https://")):
        base = f"http://{match.group('where')}"
    deadline = deadline_s if deadline_s is not None else DEFAULT_DEADLINE_S
    pacs = Pacs(base, timeout=min(SERVE_TIMEOUT_S, deadline), deadline_s=deadline)
    instance = Instance(match.group("study"), match.group("series"), match.group("sop"))
    client = pacs.client(retry=False)
    try:
        data = retrieve(client, instance)
    except BadAnswer:
        raise
    except network_errors() as err:
        raise unreachable(pacs, f"fetching instance {instance.sop}", err, writing=False) from err
    finally:
        client.close()
    if hashlib.sha256(data).hexdigest() != sha:
        raise DicomwebError(
            f"the PACS at {pacs.url} holds other content under {row['path']} than was indexed: "
            "sync the index (`convirt index sync --dicomweb URL`)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{sha}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target
