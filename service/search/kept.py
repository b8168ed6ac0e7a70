"""Uploads kept for a while, so that a region, a refinement, a heat-map or the viewer can use an
uploaded image again without it being sent again.

POST /v1/search/image answers an `upload_id` (an opaque url-safe token); the image's bytes (as
decoded: service/api/uploads.py image_bytes) and its encoder vector are kept under it, with the
vectors of the last few regions of it searched (so that refining a region embeds it once). Only the
principal who uploaded it may use it; another's token, an expired one or one evicted is the same
404 `unknown_upload`. The store is bounded three ways (CONVIRT_UPLOAD_TTL_S, CONVIRT_UPLOAD_KEEP,
CONVIRT_UPLOAD_KEEP_BYTES): an upload lives TTL seconds from its last use, and past the count or
the bytes the least recently used go first. Memory only: a restart forgets every upload.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import NotFound
from service.model.region import Box

TOKEN_BYTES = 18  # 24 url-safe characters
REGIONS_KEPT = 8  # region vectors kept per upload (a few floats each)


@dataclass
class KeptUpload:
    id: str
    owner: str  # the principal's user ("key:<id>", "proxy:<name>", "anonymous")
    data: bytes  # the upload as decoded (a DICOM given its preamble)
    vector: np.ndarray | None = None  # encoder space, of the whole image; None until embedded
    # encoder vectors of regions searched or refined (a Box each), the last few only
    regions: OrderedDict[Box, np.ndarray] = field(default_factory=OrderedDict)
    used: float = field(default=0.0)  # monotonic seconds of its last use

    def keep_region(self, box: Box, vector: np.ndarray) -> None:
        """Remember the encoder vector of a region of it, the last REGIONS_KEPT only (a few KB
        each: not counted against the byte bound)."""
        self.regions[box] = vector
        self.regions.move_to_end(box)
        while len(self.regions) > REGIONS_KEPT:
            self.regions.popitem(last=False)


class KeptUploads:
    """The uploads of the last TTL seconds, at most `max_entries` of at most `max_bytes` in all."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.entries: OrderedDict[str, KeptUpload] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.lock = threading.Lock()

    def keep(self, owner: str, data: bytes, vector: np.ndarray | None = None) -> KeptUpload:
        """Keep an upload for `owner`; evicts the least recently used past the bounds. One larger
        than the byte bound alone is answered a token but forgotten at once."""
        upload = KeptUpload(secrets.token_urlsafe(TOKEN_BYTES), owner, data, vector)
        with self.lock:
            upload.used = self.clock()
            self.entries[upload.id] = upload
            self.bytes += len(data)
            self._trim()
        return upload

    def get(self, owner: str, upload_id: str) -> KeptUpload:
        """The upload, its life renewed; NotFound `unknown_upload` when it is not `owner`'s, has
        expired or was evicted."""
        with self.lock:
            self._trim()
            upload = self.entries.get(upload_id)
            if upload is None or not secrets.compare_digest(upload.owner, owner):
                raise NotFound(
                    "unknown_upload",
                    "this upload is no longer kept (uploads are kept for "
                    f"{self.ttl_s:g} s after their last use, and only for who sent them): "
                    "upload the image again",
                )
            upload.used = self.clock()
            self.entries.move_to_end(upload_id)
            return upload

    def __len__(self) -> int:
        with self.lock:
            self._trim()
            return len(self.entries)

    def _trim(self) -> None:
        """Drop the expired, then the least recently used past the count or bytes; hold lock."""
        stale = self.clock() - self.ttl_s
        while self.entries:
            oldest = next(iter(self.entries.values()))
            over = len(self.entries) > self.max_entries or self.bytes > self.max_bytes
            if oldest.used > stale and not over:
                return
            self.entries.popitem(last=False)
            self.bytes -= len(oldest.data)
