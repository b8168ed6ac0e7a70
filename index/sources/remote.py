"""Images a remote source holds, named by URL in the index, fetched when served: the one entry the
service goes through, whatever the protocol.

An indexed path starting with one of PROTOCOLS' schemes names an image on a remote archive (a
PACS), not a file. Each protocol's package (e.g. index/sources/dicomweb/serving.py) implements

    fetch_one(row, deadline_s=None) -> Path      a local copy (fetched at most once), or an
                                                 IndexStoreError saying why not
    cached_copy(row) -> Path | None              that copy, when it is already there
    server_of(row) -> str                        the server the row comes from (per-server state)
    server_failed(err) -> bool                   whether a failed fetch says the whole server is
                                                 down (not only this image)

and is imported only when a row of its scheme is served. A new protocol adds its scheme here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

# scheme of an indexed path -> the module serving it
PROTOCOLS = {"dicomweb://": "index.sources.dicomweb.serving"}


def is_remote(path: str) -> bool:
    """Whether an indexed path names an image on a remote archive rather than a file."""
    return path.startswith(tuple(PROTOCOLS))


def protocol_of(row: Mapping[str, Any]) -> ModuleType:
    """The serving module of a remote row's scheme; ValueError for a local file."""
    for scheme, module in PROTOCOLS.items():
        if row["path"].startswith(scheme):
            return importlib.import_module(module)
    raise ValueError(f"{row['path']} is a local file, not a remote image")


def fetch_one(row: Mapping[str, Any], deadline_s: float | None = None) -> Path:
    """A local copy of a remote row's image, fetched from its archive within `deadline_s` seconds
    (None: the protocol's default); IndexStoreError when the archive cannot give it."""
    return protocol_of(row).fetch_one(dict(row), deadline_s=deadline_s)


def cached_copy(row: Mapping[str, Any]) -> Path | None:
    """The local copy fetch_one keeps of a remote row, or None when it was not fetched yet."""
    return protocol_of(row).cached_copy(row)


def server_of(row: Mapping[str, Any]) -> str:
    """The server a remote row is fetched from (its base URL)."""
    return protocol_of(row).server_of(row)


def server_failed(row: Mapping[str, Any], err: BaseException) -> bool:
    """Whether fetch_one failed for the row's whole server (no connection, a timeout, a 5xx), not
    for this one image (a 404, other content than was indexed)."""
    return protocol_of(row).server_failed(err)
