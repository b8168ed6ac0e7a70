"""Faults a broken or hostile PACS found (issue 21: 5 and 6), each against a deliberately
misbehaving DICOMweb/Orthanc server on loopback (tests/pacs_fake.py) and the real indexer.

5. One broken PACS instance blocked ingest for ever: a malformed WADO or QIDO answer, or garbage
   in Orthanc's /changes, ended `index build`/`sync` with a raw traceback, and every rerun fetched
   the same instance again. Now it is a listed skip, remembered, fetched again only with
   --retry-skipped.
6. Nothing bounded what a PACS sends: a 1 GB WADO body (indexer RSS 6.1 GB), QIDO pages that
   never end (5.1 GB in 60 s), a trickling WADO (the build hung), an Orthanc feed whose Last never
   advances (48,424 requests in 60 s with the index lock held). The indexer runs as a subprocess
   here, its peak RSS read from getrusage(RUSAGE_CHILDREN) of a wrapper process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pacs_fake import FakePacs

from index import cli, layout

JOB_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "1", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]
RSS_LIMIT_KB = 1536 * 1024  # the bound: indexer RSS <= 1.5 GB
# Runs the indexer as its child and prints that child's peak RSS (KiB) on its last line.
MEASURED = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call([sys.executable, '-c', "
    "'import sys; from convirt.cli import main; sys.exit(main(sys.argv[1:]))', *sys.argv[1:]])\n"
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def build(pacs: FakePacs, model: Path, root: Path, *extra: str) -> int:
    command = ["build", "--model", str(model), "--dicomweb", pacs.url, "--out", str(root)]
    return cli.main([*command, *extra, *JOB_ARGS])


def sync(pacs: FakePacs, model: Path, root: Path, *extra: str) -> int:
    command = ["sync", "--model", str(model), "--dicomweb", pacs.url, "--root", str(root)]
    return cli.main([*command, *extra, *JOB_ARGS])


def report_of(root: Path) -> dict:
    return json.loads((layout.current_version_dir(root) / "build_report.json").read_text())


def run_indexer(args: list[str], timeout: float, **env: str) -> tuple[int | None, str, int]:
    """(exit status, None when it ran past `timeout`; its output; its peak RSS in KiB)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", MEASURED, "index", *args],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        return None, (err.stderr or b"").decode(errors="replace")[-2000:], 0
    peak = int(done.stdout.strip().splitlines()[-1].split()[-1])  # MEASURED's last line
    return done.returncode, done.stdout + done.stderr, peak


# -- 5: one broken instance ----------------------------------------------------------------------

WADO_FAULTS = {
    "wrong_boundary": "do not use its boundary",
    "non_dicom_part": "not a DICOM file",
    "text_html": "text/html answer",
    "no_content_type": "without Content-Type",
    "empty_multipart": "empty multipart",
}


@pytest.mark.parametrize("fault", sorted(WADO_FAULTS))
def test_broken_pacs_instance_is_skipped_not_fatal(fault, bundle_dir, tmp_path, capsys):
    with FakePacs() as pacs:
        pacs.add(), pacs.add()
        broken = pacs.add(fault)
        root = tmp_path / "root"
        assert build(pacs, bundle_dir, root) == 0, capsys.readouterr().err
        skipped = {s["path"]: s["reason"] for s in report_of(root)["skipped"]}
        assert WADO_FAULTS[fault] in skipped[pacs.name(broken)]
        assert "--retry-skipped" in skipped[pacs.name(broken)]
        assert report_of(root)["counts"]["embedded"] == 2
        fetches = pacs.counts[f"wado {broken.sop}"]
        # remembered: neither a rebuild nor a sync fetches it again
        assert build(pacs, bundle_dir, root) == 0
        assert pacs.name(broken) in {s["path"] for s in report_of(root)["skipped"]}
        assert sync(pacs, bundle_dir, root) == 0
        assert pacs.counts[f"wado {broken.sop}"] == fetches
        # the PACS mended, --retry-skipped fetches and indexes it
        broken.behaviour = "good"
        assert sync(pacs, bundle_dir, root, "--retry-skipped") == 0
        assert pacs.counts[f"wado {broken.sop}"] == fetches + 1
        report = report_of(root)
        assert pacs.name(broken) in report["added"] and not report["skipped"]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["qido_tags_not_objects", "orthanc_changes_garbage"])
def test_broken_pacs_listing_or_feed_is_no_traceback(fault, bundle_dir, tmp_path, capsys, caplog):
    with FakePacs(orthanc=True) as pacs:
        pacs.add(), pacs.add()
        if fault == "qido_tags_not_objects":
            pacs.qido = "tags_not_objects"
        else:
            pacs.changes = "garbage"
        root = tmp_path / "root"
        assert build(pacs, bundle_dir, root) == 0, capsys.readouterr().err
        report = report_of(root)
        assert report["counts"]["embedded"] == 2
        if fault == "qido_tags_not_objects":
            assert report["counts"]["listing_records_unreadable"] == 2
            assert "UIDs cannot be read" in caplog.text
        else:
            assert (
                "recording a QIDO cursor" in caplog.text
                and pacs.url.split("/dicom")[0] in caplog.text
            )


# -- 6: nothing unbounded --------------------------------------------------------------------------


def test_pacs_body_and_listing_are_bounded(bundle_dir, tmp_path):
    with FakePacs() as pacs:
        pacs.add()
        huge = pacs.add("huge")
        args = ["build", "--model", str(bundle_dir), "--dicomweb", pacs.url, *JOB_ARGS]
        # a 1 GB WADO body, no Content-Length: refused at the size cap (default 256 MB)
        code, err, peak = run_indexer([*args, "--out", str(tmp_path / "a")], timeout=180)
        assert code == 0, err
        assert peak <= RSS_LIMIT_KB, f"indexer peak RSS {peak / 1024:.0f} MB for a 1 GB body"
        skipped = {s["path"]: s["reason"] for s in report_of(tmp_path / "a")["skipped"]}
        assert "over the 268,435,456-byte limit" in skipped[pacs.name(huge)]
        print(f"1 GB WADO body: indexer peak RSS {peak / 1024:.0f} MB")

        # QIDO pages that never end: stopped at the listing cap, nothing published
        pacs.qido = "endless"
        code, err, peak = run_indexer(
            [*args, "--out", str(tmp_path / "b")], timeout=120, CONVIRT_PACS_MAX_LISTED="100000"
        )
        assert code == 1, f"exit {code}: {err[-1500:]}"
        assert "lists more than 100,000 instances" in err and "Traceback" not in err
        assert peak <= RSS_LIMIT_KB and layout.read_current(tmp_path / "b") is None
        print(f"endless listing (cap 100,000): indexer peak RSS {peak / 1024:.0f} MB")

        # a WADO answer of a byte every 2 s: skipped at the deadline, the build ends
        pacs.qido = "normal"
        huge.behaviour = "trickle"
        code, err, _ = run_indexer(
            [*args, "--out", str(tmp_path / "c")], timeout=90, CONVIRT_PACS_DEADLINE_S="6"
        )
        assert code == 0, f"exit {code}: {err[-1500:]}"
        skipped = {s["path"]: s["reason"] for s in report_of(tmp_path / "c")["skipped"]}
        assert "not complete within the 6 s limit" in skipped[pacs.name(huge)]


@pytest.mark.parametrize("feed", ["stuck", "garbage_pages"])
def test_stuck_orthanc_feed_stops(feed, bundle_dir, tmp_path):
    with FakePacs(orthanc=True) as pacs:
        pacs.add()
        root = tmp_path / "root"
        assert build(pacs, bundle_dir, root) == 0
        with open(layout.current_version_dir(root) / "version.json") as f:
            assert json.load(f)["dicomweb"][pacs.url]["feed"] == "orthanc"
        new = pacs.add()
        pacs.changes = feed
        before = pacs.counts["changes"]
        args = ["sync", "--model", str(bundle_dir), "--dicomweb", pacs.url, "--root", str(root)]
        code, err, _ = run_indexer([*args, *JOB_ARGS], timeout=60)
        assert code == 0, f"exit {code} after {pacs.counts['changes'] - before} /changes: {err}"
        assert pacs.counts["changes"] - before < 10
        assert "listing the PACS instead" in err and "Traceback" not in err
        report = report_of(root)
        assert pacs.name(new) in report["added"]
        assert any("/changes" in w for w in report["warnings"])
        # the lock was released: the next sync runs (and finds nothing new)
        assert sync(pacs, bundle_dir, root) == 0
        assert layout.read_current(root) == "000002"
