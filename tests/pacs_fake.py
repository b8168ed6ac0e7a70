"""A DICOMweb + Orthanc REST server on loopback that misbehaves on purpose (tests/test_pacs_hostile.py).

It holds a few instances, each with its own WADO behaviour: "good" (a real little DICOM image in a
multipart/related body), "wrong_boundary", "non_dicom_part", "text_html", "no_content_type",
"empty_multipart", "huge" (a 1 GB body, generated as it is sent, with no Content-Length) and
"trickle" (a byte every `trickle_s` seconds, for ever). QIDO can answer normally, with records
whose tags are not objects ("tags_not_objects"), or with pages that never end ("endless");
Orthanc's /changes can answer normally, "stuck" (Done: false, Last never advancing), "garbage" or
"garbage_pages" (only its pages, not ?last). Every request is counted by kind, so a test can tell
what was fetched again.

A test can bound the faults that never end, so that a client without bounds of its own (the
previous code) fails it instead of hanging the test run or filling the machine's memory: a
trickle hangs up after `trickle_for_s`, an endless listing answers 500 after `endless_pages`
pages, a stuck feed answers as it should after `stuck_pages` stuck pages.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

UID_ROOT = "1.2.826.0.1.3680043.10.1137.77."
BOUNDARY = "convirt-fake-boundary"
HUGE_BYTES = 1 << 30
TRICKLE_S = 2.0


def secondary_capture(study: str, series: str, sop: str, syntax: str) -> Dataset:
    """A Secondary Capture instance with its file meta (in `syntax`) and UIDs, no pixels yet (also
    bench/dicomweb_ingest.py's)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        SecondaryCaptureImageStorage,
        sop,
    )
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    return ds


def dicom_bytes(study: str, series: str, sop: str, seed: int) -> bytes:
    """A real 32x32 8-bit Secondary Capture image, its pixels drawn from `seed`."""
    ds = secondary_capture(study, series, sop, ExplicitVRLittleEndian)
    ds.Modality, ds.PatientID, ds.StudyDate = "CR", "P-FAKE", "20240101"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 255, (32, 32), np.uint8).tobytes()
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def multipart(part: bytes, boundary: str = BOUNDARY, kind: str = "application/dicom") -> bytes:
    head = f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode()
    return head + part + f"\r\n--{boundary}--\r\n".encode()


def record(study: str, series: str, sop: str) -> dict:
    def tag(vr: str, value: object) -> dict:
        return {"vr": vr, "Value": [value]}

    return {
        "0020000D": tag("UI", study),
        "0020000E": tag("UI", series),
        "00080018": tag("UI", sop),
        "00080060": tag("CS", "CR"),
        "00080020": tag("DA", "20240101"),
    }


@dataclass
class Instance:
    study: str
    series: str
    sop: str
    behaviour: str = "good"
    seed: int = 0
    orthanc_id: str = ""


@dataclass
class FakePacs:
    instances: list[Instance] = field(default_factory=list)
    qido: str = "normal"  # normal, tags_not_objects, endless
    changes: str = "normal"  # normal, stuck, garbage
    orthanc: bool = False
    trickle_s: float = TRICKLE_S  # between two bytes of a "trickle" answer
    trickle_for_s: float | None = None  # None: a "trickle" answer never ends
    stuck_pages: int | None = None  # None: a "stuck" feed never moves on
    endless_pages: int | None = None  # None: an "endless" listing never errs
    seq: int = 5
    counts: Counter = field(default_factory=Counter)
    server: ThreadingHTTPServer | None = None

    def add(self, behaviour: str = "good") -> Instance:
        n = len(self.instances) + 1
        study = f"{UID_ROOT}{n}"
        orthanc_id = "-".join([f"{n:08x}"] * 5)
        instance = Instance(study, study + ".1", study + ".1.1", behaviour, n, orthanc_id)
        self.instances.append(instance)
        self.seq += 1
        return instance

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/dicom-web"

    def name(self, instance: Instance) -> str:
        host = self.url.removeprefix("http://")
        return (
            f"dicomweb://{host}/studies/{instance.study}/series/{instance.series}"
            f"/instances/{instance.sop}"
        )

    def __enter__(self) -> FakePacs:
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    pacs.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- answers -----------------------------------------------------------------------------------

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        path, query = parts.path.rstrip("/"), parse_qs(parts.query)
        segments = path.strip("/").split("/")
        if path == "/system":
            self.counts["system"] += 1
            if self.orthanc:
                return send(h, 200, "application/json", {"ApiVersion": 24, "Version": "1.12.0"})
            return send(h, 404, "text/plain", b"not here")
        if path == "/changes":
            return self.answer_changes(h, parts.query, query)
        if path == "/statistics":
            return send(h, 200, "application/json", {"CountInstances": len(self.instances)})
        if segments[0] == "instances" and len(segments) == 3:  # Orthanc /instances/ID/study
            found = [i for i in self.instances if i.orthanc_id == segments[1]]
            if not found:
                return send(h, 404, "text/plain", b"gone")
            return send(
                h, 200, "application/json", {"MainDicomTags": {"StudyInstanceUID": found[0].study}}
            )
        if segments[:1] == ["dicom-web"] and segments[-1] == "instances":
            return self.answer_qido(h, segments, query)
        if segments[:1] == ["dicom-web"] and len(segments) == 7:
            found = [i for i in self.instances if i.sop == segments[6]]
            if found:
                self.counts[f"wado {found[0].sop}"] += 1
                return self.answer_wado(h, found[0])
        send(h, 404, "text/plain", b"no such thing")

    def answer_qido(self, h, segments: list[str], query: dict) -> None:
        self.counts["qido"] += 1
        offset, limit = int(query.get("offset", ["0"])[0]), int(query.get("limit", ["100"])[0])
        if self.qido == "endless":
            if self.endless_pages is not None and self.counts["qido"] > self.endless_pages:
                return send(h, 500, "text/plain", b"enough")
            records = [
                record(f"{UID_ROOT}9.{n}", f"{UID_ROOT}9.{n}.1", f"{UID_ROOT}9.{n}.1.1")
                for n in range(offset, offset + limit)
            ]
            return send(h, 200, "application/dicom+json", records)
        chosen = (
            self.instances
            if len(segments) == 2
            else [i for i in self.instances if i.study == segments[2]]
        )
        records = [record(i.study, i.series, i.sop) for i in chosen]
        if self.qido == "tags_not_objects" and len(segments) == 2:
            records += [{"0020000D": "1.2.3", "0020000E": ["1.2.3.4"], "00080018": 7}, "a string"]
        send(h, 200, "application/dicom+json", records[offset : offset + limit])

    def answer_changes(self, h, raw_query: str, query: dict) -> None:
        self.counts["changes"] += 1
        asks_last = raw_query == "last"
        if self.changes == "garbage" and asks_last:
            return send(h, 200, "application/json", ["not", "an", "object"])
        if self.changes in ("garbage", "garbage_pages") and not asks_last:
            return send(h, 200, "application/json", {"Changes": "x", "Done": "no", "Last": []})
        if asks_last:
            return send(h, 200, "application/json", {"Changes": [], "Done": True, "Last": self.seq})
        since = int(query.get("since", ["0"])[0])
        if self.changes == "stuck" and (
            self.stuck_pages is None or self.counts["stuck pages"] < self.stuck_pages
        ):
            self.counts["stuck pages"] += 1
            change = {
                "ChangeType": "NewInstance",
                "ID": self.instances[-1].orthanc_id,
                "Seq": since,
            }
            return send(
                h, 200, "application/json", {"Changes": [change], "Done": False, "Last": since}
            )
        changes = [
            {"ChangeType": "NewInstance", "ID": i.orthanc_id, "Seq": 5 + n}
            for n, i in enumerate(self.instances, 1)
            if 5 + n > since
        ]
        send(h, 200, "application/json", {"Changes": changes, "Done": True, "Last": self.seq})

    def answer_wado(self, h, instance: Instance) -> None:
        good = dicom_bytes(instance.study, instance.series, instance.sop, instance.seed)
        related = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        match instance.behaviour:
            case "good":
                send(h, 200, related, multipart(good))
            case "wrong_boundary":
                send(h, 200, related, multipart(good, boundary="another-boundary"))
            case "non_dicom_part":
                send(h, 200, related, multipart(b"this is not DICOM at all" * 10))
            case "text_html":
                send(h, 200, "text/html", b"<html><body>Service temporarily moved</body></html>")
            case "no_content_type":
                send(h, 200, None, multipart(good))
            case "empty_multipart":
                send(h, 200, related, f"--{BOUNDARY}--\r\n".encode())
            case "huge":
                h.send_response(200)
                h.send_header("Content-Type", related)
                h.end_headers()  # no Content-Length: the body ends when the connection does
                h.wfile.write(multipart(b"\0" * 128 + b"DICM")[:-30])
                chunk = b"\0" * (1 << 20)
                for _ in range(HUGE_BYTES // len(chunk)):
                    h.wfile.write(chunk)
            case "trickle":
                h.send_response(200)
                h.send_header("Content-Type", related)
                h.send_header("Content-Length", str(len(multipart(good))))
                h.end_headers()
                started = time.monotonic()
                for byte in multipart(good):
                    h.wfile.write(bytes([byte]))
                    h.wfile.flush()
                    time.sleep(self.trickle_s)
                    if self.trickle_for_s and time.monotonic() - started > self.trickle_for_s:
                        h.close_connection = True  # hang up, the body short of its length
                        return


def send(h: BaseHTTPRequestHandler, status: int, kind: str | None, body: object) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h.send_response(status)
    if kind:
        h.send_header("Content-Type", kind)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
