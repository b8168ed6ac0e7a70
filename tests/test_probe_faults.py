"""Faults the hardening probe found (issue 21: 7, 8 and the small ones of 10), each checked
against a real `convirt serve` on loopback (keys, an audit log, an index with DICOM identifiers)
or the real `convirt` commands.

The other findings have their own files: the audit disk and chain (test_audit_hardening), lying
DICOMs (test_hostile_decode), heat-maps (test_explain), a hostile or slow PACS
(test_pacs_hostile, test_pacs_serving).
"""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import test_auth
from conftest import index_of_rows, serving
from serving import LOOPBACK

from convirt.bundle import load_bundle
from service.guard.access import Access
from service.settings import Settings

# test_auth's module fixtures, registered here too: a key database of this module's own
state, keys, convirt = test_auth.state, test_auth.keys, test_auth.convirt
guarded_settings, audit_entries = test_auth.guarded_settings, test_auth.audit_entries
UID_ROOT = "1.2.826.0.1.3680043.8.498.21"
FIELDS = [
    "image", "text", "modality", "case_id", "patient_id",
    "PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
]  # fmt: skip
IDENTIFIERS = {
    "patient_id", "PatientID", "AccessionNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
}  # fmt: skip


@pytest.fixture(scope="module")
def rows(datasets) -> list[dict[str, str]]:
    with open(datasets / "medpix" / "manifest.csv", newline="", encoding="utf-8") as f:
        medpix = [r for r in csv.DictReader(f) if r["split"] == "train"][:8]
    return [
        {
            "image": str(datasets / "medpix" / r["image"]),
            "text": r["text"],
            "modality": r["modality"],
            "case_id": r["case_id"],
            "patient_id": f"PAT-{n // 2:04d}",
            "PatientID": f"MRN{n // 2:06d}",
            "AccessionNumber": f"ACC{n:06d}",
            "StudyInstanceUID": f"{UID_ROOT}.{n // 2 + 1}",
            "SeriesInstanceUID": f"{UID_ROOT}.{n // 2 + 1}.{n + 1}",
            "SOPInstanceUID": f"{UID_ROOT}.{n // 2 + 1}.{n + 1}.1",
        }
        for n, r in enumerate(medpix)
    ]


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle_dir, rows) -> Path:
    folder = tmp_path_factory.mktemp("probe")
    return index_of_rows(folder, load_bundle(bundle_dir), rows, FIELDS)


@pytest.fixture(scope="module")
def server(bundle_dir, index_root, state, keys) -> Iterator:
    """Default host and proxy settings: what the probe met."""
    # case_id asked to be shown as a facet (CONVIRT_FACETS_SHOW) and named sensitive: sensitive wins
    settings = guarded_settings(
        bundle_dir,
        index_root,
        state,
        CONVIRT_SENSITIVE_FIELDS="case_id",
        CONVIRT_FACETS_SHOW="case_id",
    )
    with serving(settings) as process:
        yield process


@pytest.fixture(scope="module")
def reader(server, keys) -> Iterator[httpx.Client]:
    headers = {"X-API-Key": keys["reader"]}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as client:
        yield client


def raw_get(port: int, path: str, host: str, key: str) -> tuple[int, bytes]:
    """(status, body) of a GET with exactly this Host header."""
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(head.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


# -- 7. facets leak identifiers unaudited ----------------------------------------------------------


def test_facets_leak_no_identifiers_and_are_audited(reader, state, rows):
    before = len(audit_entries(state))
    found = reader.get("/v1/facets")
    assert found.status_code == 200, found.text
    fields = {facet["field"] for facet in found.json()["facets"]}
    assert "modality" in fields  # an ordinary field is still offered
    assert not fields & IDENTIFIERS, fields & IDENTIFIERS
    assert "case_id" not in fields  # CONVIRT_SENSITIVE_FIELDS, over CONVIRT_FACETS_SHOW
    assert rows[0]["PatientID"] not in found.text and rows[0]["AccessionNumber"] not in found.text
    entries = audit_entries(state)[before:]
    assert [entry["endpoint"] for entry in entries] == ["/v1/facets"]
    assert entries[0]["status"] == 200 and entries[0]["user"].startswith("key:")
    # identifiers stay filterable by name: a search for one patient finds only their images
    wanted = rows[2]["PatientID"]
    hits = reader.post(
        "/v1/search/text",
        json={"text": "CT", "k": 8, "group_by": "none", "filters": {"PatientID": wanted}},
    )
    assert hits.status_code == 200, hits.text
    assert len(hits.json()["results"]) == 2


# -- 8. DNS rebinding against the open demo --------------------------------------------------------


def test_dns_rebinding_host_is_refused_by_default(server, keys):
    status, body = raw_get(server.port, "/v1/facets", "evil.example.com", keys["reader"])
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["code"] == "host_not_allowed" and "CONVIRT_ALLOWED_HOSTS" in error["message"]
    # what a user types still works: the bound address and the localhost names, with a port
    for host in (f"{LOOPBACK}:{server.port}", f"localhost:{server.port}", "localhost"):
        assert raw_get(server.port, "/v1/facets", host, keys["reader"])[0] == 200, host


# -- 10. the small ones ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["must", "must_not"])
def test_nul_in_must_is_a_422(reader, field):
    for term in ("effu\x00sion", "\x00", "mass\x1b[2J"):
        refused = reader.post("/v1/search/text", json={"text": "mass", field: [term]})
        assert refused.status_code == 422, refused.text
        assert "control character" in refused.text
    # NUL elsewhere is no 500 either
    for body in (
        {"text": "mass\x00lesion"},
        {"text": "mass", "filters": {"modality": "CT\x00"}},
        {"text": "mass", "filters": {"no\x00field": "x"}},
    ):
        assert reader.post("/v1/search/text", json=body).status_code in (200, 422)


def test_x_forwarded_for_is_not_trusted_by_default(reader, state):
    before = len(audit_entries(state))
    found = reader.post(
        "/v1/search/text", json={"text": "mass"}, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert found.status_code == 200
    (entry,) = audit_entries(state)[before:]
    assert entry["client"] == LOOPBACK, entry


def test_proxy_mode_needs_the_proxy_address(tmp_path):
    env = {"CONVIRT_AUTH": "proxy", "PATH": "/usr/bin:/bin"}
    missing = ["--model", str(tmp_path / "none"), "--index-root", str(tmp_path / "none")]
    refused = convirt("serve", *missing, env=env)
    assert refused.returncode == 2
    assert "CONVIRT_FORWARDED_ALLOW_IPS" in refused.stderr


def test_faiss_file_changed_after_publish_is_refused(index_root, bundle_dir, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(index_root, copy)
    current = copy / "versions" / (copy / "CURRENT").read_text().strip()
    faiss_file = current / "joint.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[100:4000] = bytes((b * 7 + 13) % 256 for b in data[100:4000])  # same size, other bytes
    faiss_file.write_bytes(bytes(data))

    verified = convirt("index", "verify", "--root", str(copy))
    assert verified.returncode != 0 and "joint.faiss" in verified.stdout + verified.stderr
    started = convirt("serve", "--model", str(bundle_dir), "--index-root", str(copy), "--port", "0")
    assert started.returncode == 2, started.stderr
    assert "joint.faiss" in started.stderr and "SHA-256" in started.stderr


def test_unknown_and_known_key_ids_take_the_same_time(state, keys):
    """A key's id is public, its secret is not: whether an id exists must not show in the time
    a wrong key takes (the probe: unknown 1.5 ms, known 0.85 ms)."""
    access = Access(Settings(auth_db=state / "keys.sqlite"))
    known_id = keys["reader"][4:].partition(".")[0]
    known = f"cvk_{known_id}.{'x' * 43}"  # a real id, a wrong secret
    unknown = f"cvk_{'0' * 16}.{'x' * 43}"

    async def seconds(key: str) -> float:
        started = time.perf_counter()
        with pytest.raises(Exception, match="not a valid key"):
            await access.key_principal(key)
        return time.perf_counter() - started

    async def measure() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"known": [], "unknown": []}
        for _ in range(400):
            times["known"].append(await seconds(known))
            times["unknown"].append(await seconds(unknown))
        return times

    times = asyncio.run(measure())
    known_s, unknown_s = (statistics.median(times[name]) for name in ("known", "unknown"))
    assert 0.5 < unknown_s / known_s < 2.0, (known_s, unknown_s)
