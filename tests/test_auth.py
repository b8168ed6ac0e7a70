"""Access control, the audit trail and viewer links (issue 12), against real `convirt serve`
processes over a real index, with real SQLite key databases, the real `convirt keys` and `convirt
audit` commands, and the page in real Chromium.

Two servers: one requiring keys (CONVIRT_AUTH_DB and a legacy CONVIRT_API_KEY, the access log on
at info level, an audit log with hashed queries, a viewer URL), and one behind a "proxy" (the test
client on 127.0.0.1 plays it; 127.0.0.2 is anyone else) with a small rate limit. The index holds
14 real medpix images; 10 of them carry StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID
columns (two images a study).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import pytest
from conftest import browser_page, error_of, index_of_rows, server_settings, serving
from fastapi.testclient import TestClient

from convirt.bundle import load_bundle
from service.api.app import create_app
from service.guard.audit import AuditLog, head_path, verify
from service.guard.peers import AddressList, is_loopback
from service.guard.rate_limit import RateLimiter
from service.logs import DropQueryString
from service.search.viewer import dicom_uids, viewer_url
from service.settings import Settings

FIELDS = [
    "image", "text", "modality", "case_id",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
]  # fmt: skip
UID_ROOT = "1.2.826.0.1.3680043.8.498"
VIEWER = "http://pacs.example.org:8042/ohif/viewer?StudyInstanceUIDs={study}&series={series}"
LEGACY_KEY = "legacy-admin-key-0123456789"
QUERY = "Axial CT image of the chest showing a mass in the lung."


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(datasets) -> list[dict[str, str]]:
    with open(datasets / "medpix" / "manifest.csv", newline="", encoding="utf-8") as f:
        medpix = [r for r in csv.DictReader(f) if r["split"] == "train"][:14]
    picked = []
    for n, r in enumerate(medpix):
        row = {
            "image": str(datasets / "medpix" / r["image"]),
            "text": r["text"],
            "modality": r["modality"],
            "case_id": r["case_id"],
        }
        if n < 10:  # two images a study, each its own series and instance
            row["StudyInstanceUID"] = f"{UID_ROOT}.{n // 2 + 1}"
            row["SeriesInstanceUID"] = f"{UID_ROOT}.{n // 2 + 1}.{n + 1}"
            row["SOPInstanceUID"] = f"{UID_ROOT}.{n // 2 + 1}.{n + 1}.1"
        picked.append(row)
    return picked


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle_dir, rows) -> Path:
    return index_of_rows(tmp_path_factory.mktemp("auth"), load_bundle(bundle_dir), rows, FIELDS)


def convirt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `convirt` command, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "convirt.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def add_key(db: Path, name: str, role: str, *extra: str) -> str:
    done = convirt("keys", "add", "--db", str(db), "--name", name, "--role", role, *extra)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert re.fullmatch(r"cvk_[0-9a-f]{16}\.\S{20,}", key), done.stdout
    assert "shown only now" in done.stderr
    return key


def key_id(key: str) -> str:
    return key[4:].partition(".")[0]


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auth-state")


@pytest.fixture(scope="module")
def keys(state) -> dict[str, str]:
    db = state / "keys.sqlite"
    return {
        "reader": add_key(db, "reading room", "reader"),
        "admin": add_key(db, "ops", "admin"),
        "page": add_key(db, "page user", "reader"),
    }


def guarded_settings(model: Path, root: Path, state: Path, **extra: object) -> dict[str, object]:
    """A server's settings with the key database and the audit log of `state`, then `extra`."""
    return server_settings(
        model,
        root,
        CONVIRT_AUTH_DB=state / "keys.sqlite",
        CONVIRT_AUDIT_LOG=state / "audit.jsonl",
        **extra,
    )


@pytest.fixture(scope="module")
def server(bundle_dir, index_root, state, keys) -> Iterator:
    settings = guarded_settings(
        bundle_dir,
        index_root,
        state,
        CONVIRT_API_KEY=LEGACY_KEY,
        CONVIRT_VIEWER_URL=VIEWER,
        CONVIRT_LOG_LEVEL="info",
        CONVIRT_ACCESS_LOG="1",
        PYTHONUNBUFFERED="1",  # the log grep reads every line the server wrote
    )
    with serving(settings) as process:
        yield process


def as_(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def search(client: httpx.Client, key: str, text: str = QUERY, **controls) -> dict:
    response = client.post("/v1/search/text", json={"text": text, **controls}, headers=as_(key))
    assert response.status_code == 200, response.text
    return response.json()


def audit_entries(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def data_requests(image_id: str, jpeg: bytes) -> dict[str, tuple]:
    """One request for every data endpoint: (method, path, keyword arguments)."""
    return {
        "text": ("POST", "/v1/search/text", {"json": {"text": QUERY}}),
        "image": ("POST", "/v1/search/image", {"files": {"file": ("q.jpg", jpeg, "image/jpeg")}}),
        "refine": ("POST", "/v1/search/refine", {"json": {"text": QUERY, "liked": [image_id]}}),
        "facets": ("GET", "/v1/facets", {}),
        "explain": ("GET", "/v1/explain", {"params": {"image_id": image_id, "text": QUERY}}),
        "file": ("GET", f"/v1/images/{image_id}", {}),
        "thumbnail": ("GET", f"/v1/images/{image_id}/thumbnail", {}),
        "similar": ("GET", f"/v1/images/{image_id}/similar", {}),
    }


# -- keys and roles --------------------------------------------------------------------------------


def test_every_data_endpoint_needs_a_key_and_health_does_not(client, keys, rows):
    image_id = search(client, keys["reader"])["results"][0]["id"]
    jpeg = Path(rows[0]["image"]).read_bytes()
    for name, (method, path, kwargs) in data_requests(image_id, jpeg).items():
        refused = client.request(method, path, **kwargs)
        error = error_of(refused, 401, "missing_key")
        assert "X-API-Key" in error["message"], name
        assert refused.headers["www-authenticate"].startswith("APIKey"), name
        answered = client.request(method, path, headers=as_(keys["reader"]), **kwargs)
        assert answered.status_code == 200, f"{name}: {answered.text[:300]}"
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/docs"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/whoami").json() == {
        "mode": "keys", "user": None, "role": None, "note": None
    }  # fmt: skip
    who = client.get("/v1/whoami", headers=as_(keys["reader"])).json()
    assert (who["user"], who["role"]) == ("reading room", "reader")
    # the OpenAPI docs' "Authorize" button: every data operation names the key scheme
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": spec["components"]["securitySchemes"]["APIKey"]["description"],
    }  # fmt: skip
    for path in ("/v1/search/text", "/v1/images/{image_id}/thumbnail", "/v1/admin/reload"):
        (operation,) = spec["paths"][path].values()
        assert operation["security"] == [{"APIKey": []}], path
    assert "security" not in spec["paths"]["/healthz"]["get"]


@pytest.mark.parametrize(
    ("key", "code"), [(None, "missing_key"), ("cvk_0123456789abcdef." + "x" * 43, "unknown_key")]
)
def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(server, key, code):
    """Headers announcing 15 MB, then 1 KB of it: the 401 must come without the rest."""
    url = httpx.URL(server.url)
    announced = 15_000_000
    head = [
        "POST /v1/search/image HTTP/1.1",
        f"Host: {url.host}:{url.port}",
        "Content-Type: multipart/form-data; boundary=b",
        f"Content-Length: {announced}",
    ] + ([f"X-API-Key: {key}"] if key else [])
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b"--b\r\n" + bytes(1024))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # a timeout here: the server waited for the body
            if not chunk:
                break
            answer += chunk
    status, _, body = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 401"), answer[:300]
    assert json.loads(body.partition(b"\r\n\r\n")[2])["error"]["code"] == code


def test_a_wrong_key_is_a_401_that_says_so(client, keys):
    for wrong in ("nonsense", "cvk_0123456789abcdef." + "x" * 43, keys["reader"][:-2] + "zz"):
        error_of(client.get("/v1/facets", headers=as_(wrong)), 401, "unknown_key")


def test_a_reader_searches_and_views_but_cannot_reload(client, keys):
    found = search(client, keys["reader"])
    assert found["results"]
    error = error_of(client.post("/v1/admin/reload", headers=as_(keys["reader"])), 403)
    assert error["code"] == "role_too_low"
    assert "admin" in error["message"] and error["details"] == {"needed": "admin", "role": "reader"}


def test_admin_keys_reload_and_the_legacy_api_key_is_one(client, keys):
    for key in (keys["admin"], LEGACY_KEY):
        response = client.post("/v1/admin/reload", headers=as_(key))
        assert response.status_code == 200, response.text
        assert response.json()["reloaded"] is False
        assert search(client, key)["results"]  # an admin may do all a reader may
    who = client.get("/v1/whoami", headers=as_(LEGACY_KEY)).json()
    assert (who["user"], who["role"]) == ("CONVIRT_API_KEY", "admin")


def test_a_revoked_key_stops_working_without_a_restart(client, state):
    db = state / "keys.sqlite"
    key = add_key(db, "temp", "reader")
    assert client.get("/v1/facets", headers=as_(key)).status_code == 200
    listed = convirt("keys", "list", "--db", str(db))
    assert listed.returncode == 0 and key_id(key) in listed.stdout
    assert key.partition(".")[2] not in listed.stdout and key not in (
        db.read_bytes().decode("latin1")
    )
    revoked = convirt("keys", "revoke", "--db", str(db), key_id(key))
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 5
    while (response := client.get("/v1/facets", headers=as_(key))).status_code == 200:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.2)
    error = error_of(response, 401, "revoked_key")
    assert key_id(key) in error["message"]
    again = convirt("keys", "revoke", "--db", str(db), key_id(key))
    assert again.returncode == 1 and "already revoked" in again.stderr
    assert re.search(
        rf"{key_id(key)}\s+reader\s+revoked", convirt("keys", "list", "--db", str(db)).stdout
    )


def test_an_expired_key_is_refused(client, state):
    key = add_key(state / "keys.sqlite", "short", "reader", "--expires-days", "0.00002")  # ~2 s
    time.sleep(2.5)
    error_of(client.get("/v1/facets", headers=as_(key)), 401, "expired_key")


# -- the audit trail -------------------------------------------------------------------------------


def test_audit_records_searches_and_views_with_the_query_hashed(client, keys, state, rows):
    text = "Large mass in the right upper lobe, audit test."
    found = search(client, keys["reader"], text, k=4)
    shown = []
    for result in found["results"]:
        shown.append(result["id"])
        shown += [member["id"] for member in (result["group"] or {"more": []})["more"]]
    viewed = found["results"][0]["id"]
    assert client.get(f"/v1/images/{viewed}", headers=as_(keys["reader"])).status_code == 200
    explained = client.get(
        "/v1/explain", params={"image_id": viewed, "text": text}, headers=as_(keys["reader"])
    )
    assert explained.status_code == 200

    entries = audit_entries(state)
    salt = bytes.fromhex((state / "audit.jsonl.salt").read_text().strip())
    expected_hash = hmac.new(salt, text.encode(), hashlib.sha256).hexdigest()
    who = f"key:{key_id(keys['reader'])}"
    searched = [
        e
        for e in entries
        if e["endpoint"] == "/v1/search/text" and e.get("query_hash") == expected_hash
    ]
    assert len(searched) == 1
    entry = searched[0]
    assert (entry["user"], entry["name"], entry["role"]) == (who, "reading room", "reader")
    assert entry["status"] == 200 and entry["client"] == "127.0.0.1" and entry["method"] == "POST"
    assert entry["results"] == shown
    assert "query_text" not in entry
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    view = [
        e for e in entries if e["endpoint"] == "/v1/images/{image_id}" and e["seq"] > entry["seq"]
    ]
    assert view[0]["images"] == [viewed] and view[0]["user"] == who
    explain = [e for e in entries if e["endpoint"] == "/v1/explain" and e["seq"] > entry["seq"]]
    assert explain[0]["images"] == [viewed] and explain[0]["query_hash"] == expected_hash
    # no query text anywhere in the log, and the salt is beside it, not in it
    log_text = (state / "audit.jsonl").read_text()
    assert text not in log_text and quote_plus(text) not in log_text
    assert salt.hex() not in log_text
    # an upload is recorded by its salted hash only
    jpeg = Path(rows[2]["image"]).read_bytes()
    uploaded = client.post(
        "/v1/search/image",
        files={"file": ("q.jpg", jpeg, "image/jpeg")},
        headers=as_(keys["reader"]),
    )
    assert uploaded.status_code == 200
    last = audit_entries(state)[-1]
    assert last["endpoint"] == "/v1/search/image" and "query_hash" not in last
    assert last["upload_hash"] == hmac.new(salt, jpeg, hashlib.sha256).hexdigest()
    assert last["results"][0] == uploaded.json()["results"][0]["id"]
    # refused requests of a known key are recorded too
    error_of(client.post("/v1/admin/reload", headers=as_(keys["reader"])), 403)
    last = audit_entries(state)[-1]
    assert (last["endpoint"], last["status"], last["user"]) == ("/v1/admin/reload", 403, who)


def test_the_audit_write_is_timed_in_the_stage_histograms(client, keys):
    search(client, keys["reader"], "Small left pleural effusion.", k=2)
    metrics = client.get("/metrics").text
    count = re.search(r'^convirt_search_stage_seconds_count\{stage="audit"\} (\S+)$', metrics, re.M)
    assert count and float(count.group(1)) > 0


def test_each_audit_line_is_on_disk_before_its_head(tmp_path, monkeypatch):
    """The order that lets a power cut lose nothing answered and never leave the head ahead."""
    log = AuditLog(tmp_path / "audit.jsonl")
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    for n in range(2):
        log.append({"endpoint": "/v1/search/text", "n": n})
    path, head = log.path.resolve(), head_path(log.path).resolve()
    once = [str(path), f"{head}.tmp", str(path.parent)]
    assert synced == once * 2
    assert verify(log.path).ok


def test_convirt_audit_filters_and_exports_csv(client, keys, state):
    text = "Audit export: small pleural effusion."
    found = search(client, keys["admin"], text, k=2, group_by="none")
    image_id = found["results"][0]["id"]
    log = str(state / "audit.jsonl")

    exported = convirt("audit", "--log", log, "--user", "ops", "--csv")
    assert exported.returncode == 0, exported.stderr
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert table and {row["name"] for row in table} == {"ops"}
    assert {"seq", "time", "user", "endpoint", "query_hash", "images", "results", "hash"} <= set(
        table[0]
    )
    row = table[-1]
    assert row["endpoint"] == "/v1/search/text"
    assert row["results"].split() == [r["id"] for r in found["results"]]

    by_query = convirt("audit", "--log", log, "--query", text, "--csv")
    (match,) = list(csv.DictReader(io.StringIO(by_query.stdout)))
    assert match["seq"] == row["seq"] and text not in by_query.stdout
    by_image = convirt("audit", "--log", log, "--image", image_id, "--csv")
    assert row["seq"] in [r["seq"] for r in csv.DictReader(io.StringIO(by_image.stdout))]
    later = convirt("audit", "--log", log, "--since", "2999-01-01", "--csv")
    assert later.stdout.strip().splitlines() == [exported.stdout.splitlines()[0]]  # the header
    earlier = convirt("audit", "--log", log, "--until", "2000-01-01")
    assert earlier.returncode == 0 and earlier.stdout == ""
    listing = convirt("audit", "--log", log, "--user", key_id(keys["admin"]))
    assert "/v1/search/text" in listing.stdout and text not in listing.stdout


def test_convirt_audit_verify_finds_an_edited_or_deleted_line(client, keys, state, tmp_path):
    for n in range(3):
        search(client, keys["reader"], f"verify test {n}", k=2)
    copy = tmp_path / "audit.jsonl"
    for suffix in ("", ".head", ".salt", ".key"):
        shutil.copy(state / f"audit.jsonl{suffix}", tmp_path / f"audit.jsonl{suffix}")
    lines = copy.read_text().splitlines(keepends=True)
    assert len(lines) >= 6

    intact = convirt("audit", "verify", "--log", str(copy))
    assert intact.returncode == 0 and f"{len(lines)} entries" in intact.stdout

    edited = list(lines)
    entry = json.loads(edited[3])
    entry["status"] = 404 if entry["status"] == 200 else 200
    edited[3] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    copy.write_text("".join(edited))
    found = convirt("audit", "verify", "--log", str(copy))
    assert found.returncode == 1 and "line 4:" in found.stderr and "edited" in found.stderr

    copy.write_text("".join(lines[:2] + lines[3:]))  # the third line deleted
    found = convirt("audit", "verify", "--log", str(copy))
    assert found.returncode == 1 and "line 3:" in found.stderr and "deleted" in found.stderr

    copy.write_text("".join(lines[:-1]))  # the last line deleted
    found = convirt("audit", "verify", "--log", str(copy))
    assert found.returncode == 1 and "deleted from the end" in found.stderr

    rehashed = json.loads(lines[3])  # an edit with its plain hash recomputed: not the keyed one
    rehashed["status"] = 500
    rehashed.pop("hash")
    rehashed["hash"] = hashlib.sha256(
        json.dumps(rehashed, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    copy.write_text("".join([*lines[:3], json.dumps(rehashed) + "\n", *lines[4:]]))
    found = convirt("audit", "verify", "--log", str(copy))
    assert found.returncode == 1 and "line 4:" in found.stderr and "keyed hash" in found.stderr

    live = convirt("audit", "verify", "--log", str(state / "audit.jsonl"))
    assert live.returncode == 0, live.stderr


def test_the_logs_hold_no_query_or_report_text(server, client, keys, rows):
    texts = [
        "Zebra-pattern opacity audit probe in the left lower lobe.",
        "Refine probe: crescent sign near the hilum.",
        "Explain probe: tree-in-bud nodules at the apex.",
    ]
    key = as_(keys["reader"])
    found = search(client, keys["reader"], texts[0], k=5)
    reports = [r["report"] for r in found["results"] if r["report"]]
    image_id = found["results"][0]["id"]
    refined = client.post(
        "/v1/search/refine", json={"text": texts[1], "liked": [image_id]}, headers=key
    )
    assert refined.status_code == 200
    reports += [r["report"] for r in refined.json()["results"] if r["report"]]
    explained = client.get(
        "/v1/explain", params={"image_id": image_id, "text": texts[2]}, headers=key
    )
    assert explained.status_code == 200
    jpeg = Path(rows[3]["image"]).read_bytes()
    uploaded = client.post(
        "/v1/search/image", files={"file": ("scan.jpg", jpeg, "image/jpeg")}, headers=key
    )
    assert uploaded.status_code == 200
    similar = client.get(f"/v1/images/{image_id}/similar", params={"k": 3}, headers=key)
    assert similar.status_code == 200
    assert reports

    deadline = time.monotonic() + 10
    while (
        '"GET /v1/images/' not in server.output()
        or '/similar?… HTTP/1.1" 200' not in server.output()
    ):
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.1)
    output = server.output()
    assert re.search(r'"GET /v1/explain\?… HTTP/1\.1" 200', output), output[-2000:]
    assert "INFO" in output
    for text in texts:
        for form in (text, quote_plus(text), quote(text)):
            assert form not in output, form
    for word in ("Zebra", "crescent", "tree-in-bud"):
        assert word not in output, word
    for report in reports:
        assert report.strip()[:40] not in output
    assert keys["reader"] not in output and key_id(keys["reader"]) not in output


# -- results lead back to the PACS -----------------------------------------------------------------


def test_results_carry_dicom_uids_and_a_viewer_link(client, keys, rows):
    results = search(client, keys["reader"], k=100, group_by="none")["results"]
    assert len(results) == len(rows)
    with_uids = [r for r in results if r["dicom"]]
    assert len(with_uids) == 10
    for result in with_uids:
        uids = result["dicom"]
        fields = result["metadata"]["fields"]
        assert uids == {
            "study_instance_uid": fields["StudyInstanceUID"],
            "series_instance_uid": fields["SeriesInstanceUID"],
            "sop_instance_uid": fields["SOPInstanceUID"],
        }
        assert result["viewer_url"] == VIEWER.format(
            study=uids["study_instance_uid"], series=uids["series_instance_uid"]
        )
    assert all(r["viewer_url"] is None and r["dicom"] is None for r in results if not r["dicom"])
    # one card per study: the StudyInstanceUID names it
    cards = [c for c in search(client, keys["reader"], k=100)["results"] if c["dicom"]]
    assert len(cards) == 5
    for card in cards:
        assert card["group"]["field"] == "StudyInstanceUID"
        assert card["group"]["key"] == card["dicom"]["study_instance_uid"]


def test_uid_names_and_viewer_templates():
    assert dicom_uids({"study_uid": "1.2", "Series Instance UID": "1.2.3", "sop_uid": ""}) == {
        "study": "1.2",
        "series": "1.2.3",
    }
    assert viewer_url("http://v/?s={study}&i={instance}", {"study": "1.2"}) is None
    assert viewer_url("http://v/{study}", {"study": "1.2&x=<3>"}) == "http://v/1.2%26x%3D%3C3%3E"
    for bad in ("javascript:alert(1)//{study}", "http://v/{patient}", "http://v/{study"):
        with pytest.raises(ValueError):
            Settings(viewer_url=bad)


# -- open mode, the refusal off loopback, the building blocks --------------------------------------


def test_serve_refuses_a_non_loopback_address_without_auth(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CONVIRT_")}
    missing = ["--model", str(tmp_path / "none"), "--index-root", str(tmp_path / "none")]
    refused = convirt("serve", "--host", "0.0.0.0", *missing, env=env)
    assert refused.returncode == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in refused.stderr
    assert "convirt keys add" in refused.stderr and "CONVIRT_AUTH=proxy" in refused.stderr
    assert "--insecure-no-auth" in refused.stderr
    # with keys, or --insecure-no-auth, it goes on (and stops at the missing model)
    for extra_env, flags in (
        ({"CONVIRT_AUTH_DB": str(tmp_path / "keys.sqlite")}, []),
        ({}, ["--insecure-no-auth"]),
    ):
        past = convirt("serve", "--host", "0.0.0.0", *missing, *flags, env={**env, **extra_env})
        assert past.returncode == 2 and "refusing" not in past.stderr, past.stderr
    keys_without_keys = convirt("serve", "--auth", "keys", *missing, env=env)
    assert keys_without_keys.returncode == 2 and "needs keys" in keys_without_keys.stderr


def test_open_mode_on_loopback_says_so():
    # not started: no model needed for these; a Host the default allow-list serves
    client = TestClient(create_app(Settings()), base_url="http://localhost")
    assert client.get("/v1/whoami").json() == {
        "mode": "open", "user": None, "role": None,
        "note": "open: no authentication, loopback only",
    }  # fmt: skip
    assert client.get("/v1/facets").json()["error"]["code"] == "not_ready"  # past access: open
    assert client.post("/v1/admin/reload").json()["error"]["code"] == "admin_disabled"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.4") and not is_loopback("pacs")


def test_token_bucket_and_address_lists():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0  # per caller
    now[0] += 2.0
    assert limiter.take("a") == 0 and limiter.take("a") == 0 and limiter.take("a") > 0
    proxies = AddressList("10.0.0.5, 10.1.0.0/16")
    assert "10.0.0.5" in proxies and "10.1.200.3" in proxies
    assert "10.0.0.6" not in proxies and None not in proxies and "" not in proxies
    assert "8.8.8.8" in AddressList("*")


def test_access_log_records_lose_their_query_strings():
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/v1/explain?image_id=1&text=pleural+effusion", "1.1", 200), None,
    )  # fmt: skip
    assert DropQueryString().filter(record)
    assert "effusion" not in record.getMessage() and "/v1/explain?…" in record.getMessage()


# -- proxy mode ------------------------------------------------------------------------------------

RATE_BURST = 5


@pytest.fixture(scope="module")
def proxied(bundle_dir, index_root, tmp_path_factory) -> Iterator:
    folder = tmp_path_factory.mktemp("proxied")
    settings = server_settings(
        bundle_dir,
        index_root,
        CONVIRT_AUTH="proxy",
        CONVIRT_FORWARDED_ALLOW_IPS="127.0.0.1",
        CONVIRT_PROXY_ADMIN_GROUPS="radiology-admins",
        CONVIRT_PROXY_READER_GROUPS="radiology, residents",
        CONVIRT_RATE_LIMIT_PER_MINUTE="6",
        CONVIRT_RATE_LIMIT_BURST=str(RATE_BURST),
        CONVIRT_AUDIT_LOG=folder / "audit.jsonl",
    )
    with serving(settings) as process:
        yield process, folder


def signed_in(user: str, groups: str = "radiology", **extra: str) -> dict[str, str]:
    return {"X-Forwarded-User": user, "X-Forwarded-Groups": groups, **extra}


def test_proxy_mode_trusts_the_user_header_from_the_proxy_only(proxied):
    process, folder = proxied
    with httpx.Client(base_url=process.url, timeout=60) as proxy:
        found = proxy.post("/v1/search/text", json={"text": QUERY}, headers=signed_in("dana"))
        assert found.status_code == 200, found.text
        who = proxy.get("/v1/whoami", headers=signed_in("dana")).json()
        assert who == {"mode": "proxy", "user": "dana", "role": "reader", "note": None}
        error = error_of(proxy.post("/v1/admin/reload", headers=signed_in("dana")), 403)
        assert error["code"] == "role_too_low" and "admin" in error["message"]
        admin = proxy.post("/v1/admin/reload", headers=signed_in("erin", "radiology-admins"))
        assert admin.status_code == 200, admin.text
        nobody = proxy.get("/v1/facets", headers=signed_in("frank", "billing"))
        assert error_of(nobody, 403, "role_too_low")["details"] == {
            "needed": "reader",
            "role": None,
        }
        error_of(proxy.get("/v1/facets"), 401, "missing_key")  # from the proxy, nobody named
        # the client address behind the proxy is the one recorded
        forwarded = signed_in("gina", **{"X-Forwarded-For": "203.0.113.9"})
        assert proxy.get("/v1/facets", headers=forwarded).status_code == 200
        image_id = found.json()["results"][0]["id"]
        assert proxy.get(f"/v1/images/{image_id}", headers=forwarded).status_code == 200
    entry = audit_entries(folder)[-1]
    assert (entry["user"], entry["client"], entry["images"]) == (
        "proxy:gina",
        "203.0.113.9",
        [image_id],
    )

    # anyone else: the header is ignored, even when it claims to come through the proxy
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=process.url, timeout=60, transport=other) as direct:
        for headers in (
            signed_in("mallory", "radiology-admins"),
            signed_in("mallory", "radiology-admins", **{"X-Forwarded-For": "127.0.0.1"}),
        ):
            error_of(direct.get("/v1/facets", headers=headers), 401, "missing_key")
            error_of(direct.post("/v1/admin/reload", headers=headers), 401, "missing_key")
        assert direct.get("/v1/whoami", headers=signed_in("mallory")).json()["user"] is None
        assert direct.get("/healthz").status_code == 200


def test_rate_limits_answer_429_with_retry_after_per_user(proxied):
    process, _ = proxied
    with httpx.Client(base_url=process.url, timeout=60) as proxy:
        statuses = [
            proxy.get("/v1/facets", headers=signed_in("rita")).status_code
            for _ in range(RATE_BURST)
        ]
        assert statuses == [200] * RATE_BURST
        limited = proxy.get("/v1/facets", headers=signed_in("rita"))
        error = error_of(limited, 429, "rate_limited")
        retry = int(limited.headers["retry-after"])
        assert 1 <= retry <= 10 and error["details"] == {"retry_after_seconds": retry}
        assert "6 a minute" in error["message"]
        assert proxy.get("/v1/facets", headers=signed_in("sam")).status_code == 200  # per user


# -- the page --------------------------------------------------------------------------------------


def test_page_asks_for_a_key_on_401_and_keeps_it_for_the_tab_only(server, keys):
    with browser_page() as (_, page, expect):
        page.goto(server.url + "/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()  # the facets answered 401
        expect(page.locator("#access-status")).to_have_text("not signed in")
        page.fill("#key-input", "cvk_0123456789abcdef." + "x" * 43)
        page.click("#key-submit")
        expect(page.locator("#key-reason")).to_contain_text("not a valid key")  # asked again
        page.fill("#key-input", keys["page"])
        page.click("#key-submit")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(dialog).to_be_hidden()
        expect(page.locator("#access-status")).to_have_text("signed in as page user (reader)")
        expect(page.locator("#sign-out")).to_be_visible()

        page.fill("#query", QUERY)
        page.fill("#k", "6")
        page.click("#search-button")
        cards = page.locator("#grid .card")
        expect(cards).to_have_count(6)
        page.wait_for_function(
            "[...document.querySelectorAll('#grid .thumb')].every(i => i.complete && i.naturalWidth > 0)"
        )
        sources = page.locator("#grid .thumb").evaluate_all("imgs => imgs.map(i => i.src)")
        assert all(src.startswith("blob:") for src in sources), sources  # fetched with the key
        viewer = page.locator("#grid .viewer:not([hidden])")
        assert viewer.count() > 0
        assert viewer.first.get_attribute("href").startswith("http://pacs.example.org:8042/ohif/")

        stored = page.evaluate("() => ({...sessionStorage})")
        assert list(stored.values()) == [keys["page"]]
        assert page.evaluate("() => localStorage.length") == 0
        assert keys["page"] not in page.url and key_id(keys["page"]) not in page.url
        assert keys["page"] not in page.content()

        page.click("#sign-out")
        expect(dialog).to_be_visible()  # signed out: asked again, nothing of the search kept
        assert page.evaluate("() => sessionStorage.length") == 0
        assert "q=" not in page.url
        expect(page.locator("#grid .card")).to_have_count(0)
