"""One ingest record (issue 23, item 4): an image is read twice at most on a cold build (hashed,
decoded), and its DICOM header fields have one spelling whether it came from a folder or a PACS.

Real builds through `convirt index build`: from a folder, and from the fake DICOMweb server of
tests/pacs_fake.py holding the very same DICOM file; and an index with the spellings older builds
stored, migrated by `convirt index reindex`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
from collections import Counter
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from pacs_fake import FakePacs, dicom_bytes

from index import cli, layout
from index.read.store import open_current

JOB_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "1", "--no-progress"]
DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"

# -- counting opens: an audit hook sees every open() and os.open() of this process, with its path
_watched: set[str] = set()
_opens: Counter = Counter()
_lock = threading.Lock()


def _count_opens(event: str, args: tuple) -> None:
    if event == "open" and _watched and isinstance(args[0], str | bytes | os.PathLike):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path in _watched:
            with _lock:
                _opens[path] += 1


sys.addaudithook(_count_opens)  # an audit hook stays for the process: it counts only when asked


def only_rows(root: Path) -> list[dict]:
    with open_current(root) as store:
        return [store.get(int(i)) for i in store.ids]


def test_a_cold_build_reads_each_image_twice_at_most(bundle_dir, tmp_path):
    """Hashed once, decoded once; the cache's record gives the rest (sizes, header, thumbnail),
    so neither the embedding job nor the thumbnail opens the file again."""
    folder = tmp_path / "images"
    folder.mkdir()
    files = [folder / "ct.dcm", folder / "mr.dcm"]
    for name, target in zip(("CT_small.dcm", "MR_small.dcm"), files, strict=True):
        target.write_bytes((DICOM_DIR / name).read_bytes())
    cache = tmp_path / "cache"  # empty: a cold build
    command = ["build", "--model", str(bundle_dir), "--images", str(folder)]
    command += ["--out", str(tmp_path / "root"), "--cache", str(cache), *JOB_ARGS]
    _watched.update(str(f) for f in files)
    try:
        assert cli.main(command) == 0
    finally:
        _watched.clear()
    assert {str(f): _opens[str(f)] for f in files} == {str(f): 2 for f in files}
    rows = only_rows(tmp_path / "root")
    assert len(rows) == 2 and {r["modality"] for r in rows} == {"CT", "MR"}
    assert all(r["size_bytes"] == Path(r["path"]).stat().st_size for r in rows)
    assert all(r["meta"]["StudyInstanceUID"] for r in rows)


@pytest.fixture()
def pacs_and_folder_rows(bundle_dir, tmp_path) -> tuple[dict, dict]:
    """The row of one DICOM built from a PACS, and the row of the same file built from a folder."""
    with FakePacs() as pacs:
        instance = pacs.add()
        root = tmp_path / "pacs-root"
        command = ["build", "--model", str(bundle_dir), "--dicomweb", pacs.url]
        assert cli.main([*command, "--out", str(root), *JOB_ARGS]) == 0
    folder = tmp_path / "images"
    folder.mkdir()
    data = dicom_bytes(instance.study, instance.series, instance.sop, instance.seed)
    (folder / "instance.dcm").write_bytes(data)
    command = ["build", "--model", str(bundle_dir), "--images", str(folder)]
    assert cli.main([*command, "--out", str(tmp_path / "folder-root"), *JOB_ARGS]) == 0
    (from_pacs,) = only_rows(root)
    (from_folder,) = only_rows(tmp_path / "folder-root")
    assert from_pacs["sha256"] == from_folder["sha256"]  # the very same file
    return from_pacs, from_folder


def test_pacs_and_folder_dicom_have_the_same_metadata_keys(pacs_and_folder_rows):
    from_pacs, from_folder = pacs_and_folder_rows
    assert set(from_pacs["meta"]) == set(from_folder["meta"])
    assert from_pacs["meta"] == from_folder["meta"]
    expected = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality"}
    assert expected | {"PatientID", "StudyDate"} <= set(from_folder["meta"])
    assert from_pacs["modality"] == from_folder["modality"] == "XR"  # CR, normalised (index.fields)
    assert from_folder["meta"]["Modality"] == from_folder["meta"]["modality_original"] == "CR"


def test_reindex_renames_the_former_spellings_of_an_older_index(bundle_dir, tmp_path):
    """An index built before the naming table stored a folder DICOM's fields as study_uid,
    modality, ...: `convirt index reindex` migrates them; a manifest's own columns stay."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes((DICOM_DIR / "CT_small.dcm").read_bytes())
    root = tmp_path / "root"
    command = ["build", "--model", str(bundle_dir), "--images", str(folder), "--out", str(root)]
    assert cli.main([*command, *JOB_ARGS]) == 0
    (new,) = only_rows(root)
    former = {"modality": "CT", "study_uid": new["meta"]["StudyInstanceUID"], "age": "40"}
    meta_db = layout.current_version_dir(root) / "meta.sqlite"
    with closing(sqlite3.connect(meta_db)) as conn, conn:  # what an older build wrote
        conn.execute("UPDATE images SET meta = ?", (json.dumps(former),))
    assert cli.main(["reindex", "--root", str(root), "--index-type", "flat"]) == 0
    (migrated,) = only_rows(root)
    assert migrated["meta"] == {
        "Modality": "CT",
        "StudyInstanceUID": former["study_uid"],
        "age": "40",
        "modality_original": "CT",  # and the modality normalised (index.fields)
    }
    assert migrated["modality"] == "CT"
