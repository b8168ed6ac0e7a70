"""The one way this package talks HTTP to a PACS: every answer bounded in size and in time.

A PACS is a server we do not control; a broken or hostile one must not take the indexer (or the
service) down with it. So every request here:
- is streamed (requests stream=True) and refused as soon as its body passes a byte cap (checked
  on Content-Length first), so a 1 GB WADO body or a QIDO page that never ends costs at most the
  cap in memory;
- has a total deadline, not only a per-read timeout: a watchdog shuts the socket down when it
  passes, so a PACS sending a byte every few seconds ends there;
- is parsed defensively: a WADO answer must be multipart/related with a DICOM Part-10 part, a
  JSON answer must be JSON. Anything else is a BadAnswer naming the server and the request, never
  a raw TypeError/KeyError/InvalidDicomError.

A BadAnswer for one instance becomes a listed skip (download.py); for a listing or the
change feed it is an error (listing.py, orthanc.py). A PACS that does not answer at all (refused,
reset, HTTP 5xx after the retries) is `unreachable`: the write stops and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..base import SourceError

log = logging.getLogger(__name__)

TOKEN_ENV, USER_ENV, PASSWORD_ENV = (
    "CONVIRT_DICOMWEB_TOKEN",
    "CONVIRT_DICOMWEB_USER",
    "CONVIRT_DICOMWEB_PASSWORD",
)
RETRY_ATTEMPTS = 3
RETRY_STATUS = (429, 502, 503, 504)
CHUNK_BYTES = 1 << 16
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON_ACCEPT = "application/dicom+json, application/json"
# Instance answers that are about that instance (a skip), not about the PACS (a stop).
SKIP_STATUS = (400, 404, 406, 410, 415, 422)


class DicomwebError(SourceError):
    """The PACS cannot be used as asked (unreachable, refusing, a bad setting); the message says
    what to do. Nothing was published."""


class BadAnswer(DicomwebError):
    """The PACS answered, but not what was asked (malformed, too large, too slow). `detail` is
    the short reason a skipped instance is listed with."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def session():
    """An HTTP session with the PACS credentials of the environment: CONVIRT_DICOMWEB_TOKEN (a
    bearer token), else CONVIRT_DICOMWEB_USER and CONVIRT_DICOMWEB_PASSWORD (basic auth)."""
    import requests

    http = requests.Session()
    token = os.environ.get(TOKEN_ENV)
    user = os.environ.get(USER_ENV)
    if token:
        http.headers["Authorization"] = f"Bearer {token}"
    elif user:
        http.auth = (user, os.environ.get(PASSWORD_ENV, ""))
    return http


def unreachable(pacs, doing: str, err: BaseException, writing: bool = True) -> DicomwebError:
    """The error for a PACS that did not answer: what failed, and (writing an index) that nothing
    was published and a rerun resumes."""
    import requests

    if isinstance(err, requests.Timeout):
        what = f"did not answer within {pacs.timeout:g} s"
    elif isinstance(err, requests.ConnectionError):
        what = "cannot be reached"
    elif isinstance(err, requests.HTTPError) and err.response is not None:
        what = f"answered HTTP {err.response.status_code} {err.response.reason}"
    else:
        what = f"failed ({type(err).__name__}: {err})"
    if not writing:
        return DicomwebError(f"the PACS at {pacs.url} {what} while {doing}")
    return DicomwebError(
        f"the PACS at {pacs.url} {what} while {doing}. Nothing was published: the current "
        "version keeps serving. Check the URL and the server (`curl "
        f"{pacs.url}/studies?limit=1`), then run the same command again: it resumes"
    )


def network_errors() -> tuple[type[BaseException], ...]:
    import requests

    return (requests.RequestException, OSError)


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


class PacsHttp:
    """Bounded GETs against one PACS (`pacs`: its url, timeout, deadline_s), on one session.
    `retry`: a request that gets no answer, or 429/502/503/504, is tried RETRY_ATTEMPTS times in
    all, after 1 s, then 2 s (within the deadline)."""

    def __init__(self, pacs, retry: bool = True, deadline_s: float | None = None):
        self.pacs = pacs
        self.retry = retry
        self.deadline_s = deadline_s if deadline_s is not None else pacs.deadline_s
        self.http = session()

    def close(self) -> None:
        self.http.close()

    def get(
        self,
        url: str,
        doing: str,
        *,
        accept: str,
        max_bytes: int,
        params: list[tuple[str, Any]] | None = None,
        ok: tuple[int, ...] = (),
    ) -> Answer:
        """The answer to GET url, its body whole (at most max_bytes), within the deadline.
        Statuses in `ok` are answered as they are; other 4xx/5xx raise requests.HTTPError."""
        import requests

        deadline = time.monotonic() + self.deadline_s
        attempts = RETRY_ATTEMPTS if self.retry else 1
        for attempt in range(1, attempts + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.too_slow(url, doing)
            try:
                response = self.http.get(
                    url,
                    params=params,
                    headers={"Accept": accept},
                    stream=True,
                    timeout=(min(10.0, self.pacs.timeout, left), min(self.pacs.timeout, left)),
                )
            except (requests.ConnectionError, requests.Timeout):
                if attempt == attempts or time.monotonic() + attempt > deadline:
                    raise
                time.sleep(attempt)
                continue
            status = response.status_code
            if status in RETRY_STATUS and attempt < attempts:
                response.close()
                time.sleep(attempt)
                continue
            if status >= 400 and status not in ok:
                response.close()
                response.raise_for_status()
            body = self.read_body(response, url, doing, max_bytes, deadline)
            return Answer(status, response.headers.get("Content-Type", ""), body)
        raise AssertionError("unreachable")  # the loop returns or raises

    def read_body(self, response, url: str, doing: str, max_bytes: int, deadline: float) -> bytes:
        """The body of a streamed response: refused past max_bytes, cut at the deadline (a
        watchdog shuts the socket down, so a trickle cannot hold a read open)."""
        import requests

        declared = response.headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > max_bytes:
            response.close()
            raise self.too_large(url, doing, max_bytes, f"{int(declared):,} bytes declared")
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            sock = _socket_of(response)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
        watchdog.daemon = True
        watchdog.start()
        body = bytearray()
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                body += chunk
                if len(body) > max_bytes:
                    raise self.too_large(url, doing, max_bytes, "more was sent")
                if expired.is_set():
                    break
        except (requests.RequestException, OSError, ValueError):
            if not expired.is_set():
                raise
        finally:
            watchdog.cancel()
            response.close()
        if expired.is_set():
            raise self.too_slow(url, doing)
        return bytes(body)

    def get_json(
        self, url: str, doing: str, *, max_bytes: int, params=None, missing_ok: bool = False
    ) -> Any:
        """GET url as JSON (None for a 404 when missing_ok; [] for an empty QIDO answer)."""
        ok = (404, 204) if missing_ok else (204,)
        answer = self.get(url, doing, accept=JSON_ACCEPT, max_bytes=max_bytes, params=params, ok=ok)
        if answer.status == 404:
            return None
        if answer.status == 204 or not answer.body.strip():
            return []
        try:
            return json.loads(answer.body)
        except (ValueError, UnicodeDecodeError) as err:
            kind = answer.content_type or "no Content-Type"
            raise self.bad(
                url, doing, f"not JSON ({kind}, {len(answer.body):,} bytes: {err})"
            ) from None

    def bad(self, url: str, doing: str, detail: str) -> BadAnswer:
        return BadAnswer(
            f"the PACS at {self.pacs.url} answered GET {url} ({doing}) with {detail}. Check the "
            "server (its logs, `curl` that URL); nothing was published",
            detail,
        )

    def too_large(self, url: str, doing: str, max_bytes: int, what: str) -> BadAnswer:
        return self.bad(url, doing, f"a body over the {max_bytes:,}-byte limit ({what})")

    def too_slow(self, url: str, doing: str) -> BadAnswer:
        return self.bad(
            url, doing, f"an answer not complete within the {self.deadline_s:g} s limit"
        )


def _socket_of(response) -> socket.socket | None:
    """The socket under a streamed requests response (urllib3 2.x), or None."""
    raw = getattr(response, "raw", None)
    connection = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        return sock
    fp = getattr(getattr(raw, "_fp", None), "fp", None)
    return getattr(getattr(fp, "raw", None), "_sock", None)


# -- WADO-RS: one instance in a multipart/related body ---------------------------------------------

BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def dicom_part(answer: Answer) -> bytes:
    """The DICOM Part-10 bytes of a WADO-RS instance answer; ValueError with a short reason when
    the answer is no multipart/related body holding one."""
    kind = answer.content_type.strip()
    if not kind:
        raise ValueError("an answer without Content-Type (expected multipart/related DICOM)")
    main = kind.split(";", 1)[0].strip().lower()
    if main == "application/dicom":  # a single part, sent bare (some servers do)
        part = answer.body
    elif main != "multipart/related":
        raise ValueError(f"a {main} answer (expected multipart/related DICOM)")
    else:
        found = BOUNDARY.search(kind)
        if not found:
            raise ValueError("a multipart/related answer without a boundary")
        part = _first_part(answer.body, (found.group(1) or found.group(2)).encode("latin-1"))
    if len(part) < 132 or part[128:132] != b"DICM":
        raise ValueError(f"a part that is not a DICOM file ({len(part):,} bytes, no DICM preamble)")
    return part


def _first_part(body: bytes, boundary: bytes) -> bytes:
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise ValueError("a multipart body whose parts do not use its boundary")
    start += len(delimiter)
    if body[start : start + 2] == b"--":
        raise ValueError("an empty multipart body (no part)")
    headers_end = body.find(b"\r\n\r\n", start)
    if headers_end < 0:
        raise ValueError("a multipart part without headers")
    headers = body[start:headers_end].decode("latin-1").lower()
    for line in headers.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "content-type" and not value.strip().startswith("application/dicom"):
            raise ValueError(f"a {value.strip()[:60]} part (expected application/dicom)")
    content = headers_end + 4
    end = body.find(b"\r\n" + delimiter, content)
    if end < 0:
        raise ValueError("a multipart part that is never closed by its boundary")
    return body[content:end]


def normalised_dicom(part: bytes) -> bytes:
    """The part as pydicom writes it back (what indexes have always hashed); ValueError with a
    short reason when pydicom cannot read it."""
    import pydicom

    from convirt.decode_budget import ImageDecodeError, check_deflated

    try:
        check_deflated(io.BytesIO(part))  # pydicom would inflate a deflated dataset unbounded
    except ImageDecodeError as err:
        raise ValueError(str(err)) from None
    try:
        dataset = pydicom.dcmread(io.BytesIO(part))
        out = io.BytesIO()
        pydicom.dcmwrite(out, dataset)
    except Exception as err:  # pydicom raises many types for malformed files
        raise ValueError(f"an unreadable DICOM part ({type(err).__name__}: {err})") from None
    return out.getvalue()
