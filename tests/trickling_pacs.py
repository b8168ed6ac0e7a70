"""A deliberately slow DICOMweb server in a thread, and an index whose images it holds.

FakePacs answers WADO-RS instance requests (GET .../studies/S/series/R/instances/I) as a PACS
does, a multipart/related body with one application/dicom part, either at once or (slow) one byte
every `interval` seconds under a Content-Length it never reaches: each read comes well within a
client's per-read timeout, so only a total deadline ends the wait. recover() answers at once from
then on and ends the trickles. It counts the requests it was sent for each instance.

point_rows_at(root, ids, pacs) rewrites rows of a real index (built from real files) so they
name instances of the fake PACS, as `convirt index build --dicomweb` would have stored them: the
dicomweb:// path, the server as source, the hash and size of the bytes it serves.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom

from index import layout

DICOM_FILE = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
BOUNDARY = "fake-pacs-boundary"
STUDY = "1.2.826.0.1.3680043.10.1137.21"


def instance_bytes(sop: str) -> bytes:
    """CT_small under another SOPInstanceUID, as the client rewrites what it fetches (pydicom
    reads it and writes it again): the bytes the index records the hash of."""
    dataset = pydicom.dcmread(DICOM_FILE)
    dataset.SOPInstanceUID = sop
    dataset.file_meta.MediaStorageSOPInstanceUID = sop
    out = io.BytesIO()
    pydicom.dcmwrite(out, dataset)
    return out.getvalue()


class FakePacs:
    """A DICOMweb server on loopback: slow (trickling) until recover()."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.instances: dict[str, bytes] = {}
        self.requests: dict[str, int] = {}  # by SOPInstanceUID
        self.recovered = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/dicom-web"

    def name(self, sop: str) -> str:
        """The dicomweb:// path the index stores for an instance."""
        return f"dicomweb://127.0.0.1:{self.server.server_port}/dicom-web/studies/{STUDY}" + (
            f"/series/{STUDY}.1/instances/{sop}"
        )

    def add(self, sop: str) -> bytes:
        self.instances[sop] = instance_bytes(sop)
        return self.instances[sop]

    def recover(self) -> None:
        self.recovered.set()

    def __enter__(self) -> FakePacs:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.recovered.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                sop = self.path.rstrip("/").rsplit("/instances/", 1)[-1]
                data = pacs.instances.get(sop)
                if "/instances/" not in self.path or data is None:
                    self.send_error(404)
                    return
                with pacs._lock:
                    pacs.requests[sop] = pacs.requests.get(sop, 0) + 1
                body = (
                    f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + data
                    + f"\r\n--{BOUNDARY}--\r\n".encode()
                )
                self.send_response(200)
                self.send_header(
                    "Content-Type",
                    f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if pacs.recovered.is_set():
                    self.wfile.write(body)
                    return
                try:
                    for byte in body:  # a byte, then a wait, until recovered: then hang up
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if pacs.recovered.wait(pacs.interval):
                            break
                except OSError:  # the client gave up (its deadline)
                    pass
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def point_rows_at(root: Path, ids: list[int], pacs: FakePacs) -> dict[int, bytes]:
    """Rewrite rows `ids` of the current version of `root` as instances the fake PACS holds;
    {id: the bytes it serves for it}."""
    served = {}
    version = layout.versions_dir(root) / layout.read_current(root)
    with sqlite3.connect(version / "meta.sqlite") as conn:
        for n, image_id in enumerate(ids):
            sop = f"{STUDY}.1.{n + 1}"
            data = pacs.add(sop)
            conn.execute(
                "UPDATE images SET path = ?, source = ?, sha256 = ?, size_bytes = ? WHERE id = ?",
                (pacs.name(sop), pacs.url, hashlib.sha256(data).hexdigest(), len(data), image_id),
            )
            served[image_id] = data
    conn.close()
    return served


def wait_until(check, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return False
