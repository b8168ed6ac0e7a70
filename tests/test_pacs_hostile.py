"""Faults a broken or hostile PACS found (issue 21: 5 and 6), each against a deliberately
misbehaving DICOMweb/Orthanc server on loopback (tests/pacs_fake.py) and the real indexer.

5. One broken PACS instance blocked ingest for ever: a malformed WADO or QIDO answer, or garbage
   in Orthanc's /changes, ended `index build`/`sync` with a raw traceback, and every rerun fetched
   the same instance again. Now it is a listed skip, remembered, fetched again only with
   --retry-skipped.
6. Nothing bounded what a PACS sends: a 1 GB WADO body (indexer RSS 6.1 GB), QIDO pages that
   never end (5.1 GB in 60 s), a trickling WADO (the build hung), an Orthanc feed whose Last never
   advances (48,424 requests in 60 s with the index lock held).

The body and the listing are built in an indexer process of their own (tests/indexer_rss.py), its
peak RSS read for each build, started as this module starts so that its seconds of importing
torch pass beside the other tests; everything else runs the indexer in this process. The fake's
trickle, endless listing and stuck feed are bounded (they end after a while), so that code
without bounds of its own fails these tests instead of hanging them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from indexer_rss import IndexerRuns
from pacs_fake import FakePacs, Instance

from index import cli, layout

JOB_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "1", "--no-progress"]
RSS_LIMIT_KB = 1536 * 1024  # the bound: indexer RSS <= 1.5 GB


def build(pacs: FakePacs, model: Path, root: Path, *extra: str) -> int:
    command = ["build", "--model", str(model), "--dicomweb", pacs.url, "--out", str(root)]
    return cli.main([*command, *extra, *JOB_ARGS])


def sync(pacs: FakePacs, model: Path, root: Path, *extra: str) -> int:
    command = ["sync", "--model", str(model), "--dicomweb", pacs.url, "--root", str(root)]
    return cli.main([*command, *extra, *JOB_ARGS])


def report_of(root: Path) -> dict:
    return json.loads((layout.current_version_dir(root) / "build_report.json").read_text())


# -- 5: one broken instance ----------------------------------------------------------------------

WADO_FAULTS = {
    "wrong_boundary": "do not use its boundary",
    "non_dicom_part": "not a DICOM file",
    "text_html": "text/html answer",
    "no_content_type": "without Content-Type",
    "empty_multipart": "empty multipart",
}


def test_broken_pacs_instance_is_skipped_not_fatal(bundle_dir, tmp_path, capsys):
    """One PACS holding two good instances and one broken instance of each kind: one build
    meets all five malformed WADO answers, each a listed skip with its own reason."""
    with FakePacs() as pacs:
        pacs.add(), pacs.add()
        broken = {fault: pacs.add(fault) for fault in WADO_FAULTS}
        names = {fault: pacs.name(instance) for fault, instance in broken.items()}
        root = tmp_path / "root"

        def fetches() -> dict[str, int]:
            return {fault: pacs.counts[f"wado {i.sop}"] for fault, i in broken.items()}

        assert build(pacs, bundle_dir, root) == 0, capsys.readouterr().err
        skipped = {s["path"]: s["reason"] for s in report_of(root)["skipped"]}
        assert set(skipped) == set(names.values()), skipped
        for fault, name in names.items():
            assert WADO_FAULTS[fault] in skipped[name], (fault, skipped[name])
            assert "--retry-skipped" in skipped[name], (fault, skipped[name])
        assert report_of(root)["counts"]["embedded"] == 2
        fetched = fetches()
        assert all(fetched.values()), fetched
        # remembered: neither a rebuild nor a sync fetches them again
        assert build(pacs, bundle_dir, root) == 0
        assert {s["path"] for s in report_of(root)["skipped"]} == set(names.values())
        assert sync(pacs, bundle_dir, root) == 0
        assert fetches() == fetched
        # the PACS mended, --retry-skipped fetches and indexes each once more
        for instance in broken.values():
            instance.behaviour = "good"
        assert sync(pacs, bundle_dir, root, "--retry-skipped") == 0
        assert fetches() == {fault: n + 1 for fault, n in fetched.items()}
        report = report_of(root)
        assert set(names.values()) <= set(report["added"]) and not report["skipped"], report
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

LISTED_CAP = 20_000  # CONVIRT_PACS_MAX_LISTED for the endless listing: 20 QIDO pages
DEADLINE_S = 2.0  # CONVIRT_PACS_DEADLINE_S for the trickle


@dataclass
class Bounded:
    pacs: FakePacs  # one good instance, one whose WADO body is 1 GB
    huge: Instance
    endless: FakePacs  # QIDO pages that never end
    out: Path
    indexer: IndexerRuns  # builds from each, in a process of its own


@pytest.fixture(scope="module", autouse=True)
def bounded(bundle_dir, tmp_path_factory) -> Iterator[Bounded]:
    """The builds whose RSS is measured, started as this module starts: their indexer process
    spends its seconds of importing torch beside the tests that run in this one."""
    out = tmp_path_factory.mktemp("bounded")
    # the endless listing answers 500 after 200 pages (ten times the cap), for code without one
    with FakePacs() as pacs, FakePacs(qido="endless", endless_pages=200) as endless:
        pacs.add()
        huge = pacs.add("huge")
        args = ["build", "--model", str(bundle_dir), *JOB_ARGS]
        runs = [
            [*args, "--dicomweb", pacs.url, "--out", str(out / "body")],
            [*args, "--dicomweb", endless.url, "--out", str(out / "listing")],
        ]
        indexer = IndexerRuns(runs, out, timeout=120, CONVIRT_PACS_MAX_LISTED=str(LISTED_CAP))
        try:
            yield Bounded(pacs, huge, endless, out, indexer)
        finally:
            indexer.close()


def test_pacs_body_and_listing_are_bounded(bounded, bundle_dir, tmp_path, monkeypatch, capsys):
    # while the indexer process of `bounded` ends its builds, one here: a WADO answer of a byte
    # every 0.5 s (each well within the 30 s per-read timeout), against a deadline of 2 s (the
    # fake hangs up after 20 s, for code without a deadline); checked last
    monkeypatch.setenv("CONVIRT_PACS_DEADLINE_S", f"{DEADLINE_S:g}")
    with FakePacs(trickle_s=0.5, trickle_for_s=20) as trickling:
        trickling.add()
        slow = trickling.add("trickle")
        started = time.monotonic()
        trickle_code = build(trickling, bundle_dir, tmp_path / "trickle")
        took = time.monotonic() - started
        trickle_err = capsys.readouterr().err

    # in the indexer process of its own, its peak RSS read for each build:
    # a 1 GB WADO body, no Content-Length: refused at the size cap (default 256 MB)
    runs = bounded.indexer.results()
    assert runs, f"a build of an instance with a 1 GB WADO body: {bounded.indexer.why()}"
    code, peak, err = runs[0]
    assert peak <= RSS_LIMIT_KB, f"indexer peak RSS {peak / 1024:.0f} MB for a 1 GB body"
    assert code == 0, err[-1500:]
    skipped = {s["path"]: s["reason"] for s in report_of(bounded.out / "body")["skipped"]}
    assert "over the 268,435,456-byte limit" in skipped[bounded.pacs.name(bounded.huge)]
    print(f"1 GB WADO body: indexer peak RSS {peak / 1024:.0f} MB")

    # QIDO pages that never end: stopped at the listing cap, nothing published
    pages = bounded.endless.counts["qido"]
    assert len(runs) == 2, f"an endless listing, {pages} pages: {bounded.indexer.why()}"
    code, peak, err = runs[1]
    assert code == 1, f"exit {code}: {err[-1500:]}"
    assert f"lists more than {LISTED_CAP:,} instances" in err and "Traceback" not in err
    assert peak <= RSS_LIMIT_KB and layout.read_current(bounded.out / "listing") is None
    print(f"endless listing (cap {LISTED_CAP:,}): indexer peak RSS {peak / 1024:.0f} MB")

    # the trickle: skipped at the deadline, the build ended
    assert trickle_code == 0, f"exit {trickle_code} after {took:.0f} s: {trickle_err}"
    skipped = {s["path"]: s["reason"] for s in report_of(tmp_path / "trickle")["skipped"]}
    assert f"not complete within the {DEADLINE_S:g} s limit" in skipped[trickling.name(slow)]
    assert took < 30, f"the build took {took:.0f} s"


@pytest.mark.parametrize("feed", ["stuck", "garbage_pages"])
def test_stuck_orthanc_feed_stops(feed, bundle_dir, tmp_path, capsys, caplog):
    # a stuck feed moves on after 200 pages, so code that follows it for ever ends (and fails)
    with FakePacs(orthanc=True, stuck_pages=200) as pacs:
        pacs.add()
        root = tmp_path / "root"
        assert build(pacs, bundle_dir, root) == 0
        with open(layout.current_version_dir(root) / "version.json") as f:
            assert json.load(f)["dicomweb"][pacs.url]["feed"] == "orthanc"
        new = pacs.add()
        pacs.changes = feed
        before = pacs.counts["changes"]
        capsys.readouterr()
        code = sync(pacs, bundle_dir, root)
        err = capsys.readouterr().err + caplog.text
        assert code == 0, f"exit {code} after {pacs.counts['changes'] - before} /changes: {err}"
        assert pacs.counts["changes"] - before < 10, f"{pacs.counts['changes'] - before} /changes"
        assert "listing the PACS instead" in err and "Traceback" not in err
        report = report_of(root)
        assert pacs.name(new) in report["added"]
        assert any("/changes" in w for w in report["warnings"])
        # the lock was released: the next sync runs (and finds nothing new)
        assert sync(pacs, bundle_dir, root) == 0
        assert layout.read_current(root) == "000002"
