"""PACS ingest and sync over DICOMweb against a real Orthanc (Debian's orthanc + orthanc-dicomweb).

One Orthanc per module, on free loopback ports with its own storage, loaded over STOW-RS with real
DICOM: pydicom's CT_small and MR_small, an RT Plan (no pixels), shared covid-cxr and medpix JPEGs
wrapped as Secondary Capture with real tags, and a Structured Report holding a study's report. The
index is built once from it; the sync tests work on copies, in file order, while the PACS changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from conftest import find_tool
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from index import cli, layout
from index.fields import normalise_modality
from index.read.store import open_current
from index.sources.dicomweb import download
from index.sources.dicomweb.http import DicomwebError
from index.sources.dicomweb.pacs import Pacs
from index.sources.dicomweb.sync import sync_pacs
from index.write.build import Options
from service.api.errors import status_of_error
from service.errors import NotFound
from service.search.pacs import indexed_file

OPTIONS = Options(batch_size=4, chunk_batches=1, workers=2, progress=False)
JOB_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "2", "--no-progress"]
DICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
INSTALL = "apt-get install -y orthanc orthanc-dicomweb"
PLUGIN_PLACES = (
    "/usr/share/orthanc/plugins",
    "/usr/lib/orthanc",
    "/usr/local/share/orthanc/plugins",
)
UID_ROOT = "1.2.826.0.1.3680043.10.1137."  # made-up UIDs of the wrapped images
CXR_STUDY = UID_ROOT + "1"
MEDPIX_STUDY = UID_ROOT + "2"
NEW_STUDY = UID_ROOT + "3"
LATE_STUDY = UID_ROOT + "4"
UNKNOWN_STUDY = UID_ROOT + "999"
SR_TEXT = ["Bilateral patchy opacities in both lower lobes.", "No pleural effusion."]
CT_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
MR_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
IMAGES = 5  # CT_small, MR_small, two chest radiographs, one medpix CT


# -- DICOM made from the shared data ---------------------------------------------------------------


def wrap_jpeg(jpeg: Path, study: str, series: str, sop: str, **tags: str) -> Dataset:
    """A JPEG as a Secondary Capture instance: its bytes encapsulated as JPEG Baseline."""
    with Image.open(jpeg) as image:
        width, height, mode = image.width, image.height, image.mode
    ds = _dataset(SecondaryCaptureImageStorage, JPEGBaseline8Bit, study, series, sop, **tags)
    ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = height, width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if mode == "L":
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
        ds.PlanarConfiguration = 0
    ds.PixelData = encapsulate([jpeg.read_bytes()])
    ds["PixelData"].VR = "OB"
    return ds


def structured_report(study: str, sop: str, texts: list[str], **tags: str) -> Dataset:
    """A Comprehensive SR whose container holds one TEXT content item per sentence."""
    ds = _dataset(ComprehensiveSRStorage, ExplicitVRLittleEndian, study, sop + ".1", sop, **tags)
    ds.Modality = "SR"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    items = []
    for text in texts:
        item = Dataset()
        item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return ds


def _dataset(sop_class: str, syntax: str, study: str, series: str, sop: str, **tags) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def study_tags(patient: str, date: str, accession: str) -> dict[str, str]:
    return {
        "PatientID": patient,
        "PatientName": f"Test^{patient}",
        "StudyDate": date,
        "AccessionNumber": accession,
    }


# -- a real Orthanc ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_missing(message: str) -> None:
    if os.environ.get("CONVIRT_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{message} (CONVIRT_REQUIRE_TOOLS=1)")
    pytest.skip(message)


def orthanc_binary() -> str:
    for name in ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc"):
        if Path(name).is_file():
            return name
    return find_tool("Orthanc", INSTALL)


def dicomweb_plugin() -> Path:
    for folder in PLUGIN_PLACES:
        found = sorted(Path(folder).glob("libOrthancDicomWeb.so*"))
        if found:
            return found[0]
    tool_missing(f"the Orthanc DICOMweb plugin (libOrthancDicomWeb.so) not found: {INSTALL}")
    raise AssertionError("unreachable")


@dataclass
class Orthanc:
    rest: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"{self.rest}/dicom-web"

    def store(self, datasets: list[Dataset]) -> None:
        from dicomweb_client.api import DICOMwebClient

        DICOMwebClient(self.url).store_instances(datasets)

    def delete_study(self, study_uid: str) -> None:
        found = requests.post(f"{self.rest}/tools/lookup", data=study_uid, timeout=10).json()
        [study] = [f["ID"] for f in found if f["Type"] == "Study"]
        requests.delete(f"{self.rest}/studies/{study}", timeout=10).raise_for_status()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    folder = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "convirt-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = folder / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, str(folder / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT, cwd=folder
        )
    server = Orthanc(f"http://127.0.0.1:{http_port}", process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/studies", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer in 30 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def loaded(orthanc, datasets) -> Orthanc:
    """The PACS as a radiology archive: images of four studies, an SR, an RT Plan."""
    covid = sorted((datasets / "covid-cxr" / "images").glob("*.jpg"))
    medpix = sorted((datasets / "medpix" / "images").glob("*.jpg"))
    cxr = study_tags("P-CXR", "20240105", "ACC-CXR")
    orthanc.store(
        [
            pydicom.dcmread(DICOM_FILES / "CT_small.dcm"),
            pydicom.dcmread(DICOM_FILES / "MR_small.dcm"),
            pydicom.dcmread(DICOM_FILES / "rtplan.dcm"),
            wrap_jpeg(
                covid[0],
                CXR_STUDY,
                CXR_STUDY + ".1",
                CXR_STUDY + ".1.1",
                Modality="DX",
                ViewPosition="PA",
                BodyPartExamined="CHEST",
                **cxr,
            ),
            wrap_jpeg(
                covid[1],
                CXR_STUDY,
                CXR_STUDY + ".2",
                CXR_STUDY + ".2.1",
                Modality="DX",
                ViewPosition="LL",
                BodyPartExamined="CHEST",
                **cxr,
            ),
            structured_report(CXR_STUDY, CXR_STUDY + ".9.1", SR_TEXT, **cxr),
            wrap_jpeg(
                medpix[0],
                MEDPIX_STUDY,
                MEDPIX_STUDY + ".1",
                MEDPIX_STUDY + ".1.1",
                Modality="CT",
                BodyPartExamined="ABDOMEN",
                **study_tags("P-MPX", "20240110", "ACC-MPX"),
            ),
        ]
    )
    return orthanc


@pytest.fixture(scope="module")
def reports_csv(tmp_path_factory) -> Path:
    """The RIS table: one row by accession number, one by study UID, one for no known study."""
    path = tmp_path_factory.mktemp("ris") / "reports.csv"
    path.write_text(
        "StudyInstanceUID,AccessionNumber,report\n"
        ",ACC-MPX,Axial CT of the abdomen showing a large liver mass.\n"
        f"{CT_SMALL_STUDY},,Small CT phantom study without findings.\n"
        f"{UNKNOWN_STUDY},,A report for a study the PACS does not hold.\n"
    )
    return path


@pytest.fixture(scope="module")
def built(loaded, bundle_dir, reports_csv, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pacs-index") / "root"
    command = ["build", "--model", str(bundle_dir), "--dicomweb", loaded.url, "--out", str(root)]
    assert cli.main([*command, "--reports", str(reports_csv), *JOB_ARGS]) == 0
    return root


def copy_root(root: Path, target: Path) -> Path:
    shutil.copytree(root, target)
    return target


def report_of(root: Path) -> dict:
    return json.loads((layout.current_version_dir(root) / "build_report.json").read_text())


def sentence_links(root: Path) -> dict[str, set[int]]:
    """Report sentence -> the ids of the images whose report holds it, in the current version."""
    with open_current(root) as store:
        space = store.sentences
        return {text: set(space.images_of(n).tolist()) for n, text in enumerate(space.texts)}


def rows_by_sop(root: Path) -> dict[str, dict]:
    with open_current(root) as store:
        rows = store.get_many(store.ids.tolist()).values()
        return {row["meta"]["SOPInstanceUID"]: row for row in rows}


def pacs(orthanc: Orthanc, **settings) -> Pacs:
    return Pacs(orthanc.url, **settings)


# -- build -----------------------------------------------------------------------------------------


def test_build_from_orthanc_stores_uids_metadata_and_joined_reports(built, loaded, reports_csv):
    rows = rows_by_sop(built)
    assert len(rows) == IMAGES
    host = loaded.url.removeprefix("http://")
    for sop, row in rows.items():
        meta = row["meta"]
        study, series = meta["StudyInstanceUID"], meta["SeriesInstanceUID"]
        assert row["path"] == f"dicomweb://{host}/studies/{study}/series/{series}/instances/{sop}"
        assert row["source"] == loaded.url and row["relpath"] == f"{study}/{series}/{sop}.dcm"
        assert {"PatientID", "Modality", "StudyDate"} <= set(meta)
        assert row["modality"] == normalise_modality(meta["Modality"])  # DX, CR: XR (index.fields)
        assert meta["modality_original"] == meta["Modality"]
    pa, lateral = rows[CXR_STUDY + ".1.1"], rows[CXR_STUDY + ".2.1"]
    assert (pa["view"], lateral["view"]) == ("PA", "LL")
    assert pa["meta"]["BodyPartExamined"] == "CHEST" and pa["meta"]["AccessionNumber"] == "ACC-CXR"
    assert pa["meta"]["body_part"] == "chest"
    assert pa["meta"]["StudyDate"] == "20240105" and pa["meta"]["PatientID"] == "P-CXR"
    assert pa["report"] == lateral["report"] == " ".join(SR_TEXT)  # the SR, for every image
    assert rows[MEDPIX_STUDY + ".1.1"]["report"].startswith("Axial CT of the abdomen")  # accession
    ct = next(r for r in rows.values() if r["meta"]["StudyInstanceUID"] == CT_SMALL_STUDY)
    assert ct["report"] == "Small CT phantom study without findings." and ct["modality"] == "CT"
    mr = next(r for r in rows.values() if r["meta"]["StudyInstanceUID"] == MR_SMALL_STUDY)
    assert mr["report"] == ""

    report = report_of(built)
    [skipped] = report["skipped"]
    assert "/instances/1.2.777.777.77.7.7777.7777.20030903150023" in skipped["path"]
    assert skipped["reason"] == "no pixel data (RT Plan Storage)"
    assert report["counts"]["structured_reports"] == 1
    assert report["counts"]["report_rows_unknown"] == 1
    assert report["reports"]["unknown_keys"] == [UNKNOWN_STUDY]
    assert report["reports"]["rows"] == 3 and report["reports"]["images_with_report"] == 4
    with open_current(built) as store:
        cursor = store.info["dicomweb"][loaded.url]
        assert cursor["feed"] == "orthanc" and cursor["seq"] > 0 and cursor["instances"] == 7
        assert store.info["source"]["kind"] == "dicomweb"
        only_dx = store.search_text_vectors(
            store.vectors["joint"][:1], k=10, filters={"modality": "XR"}
        )
        assert len(only_dx[0]) == 2
    assert not (built / layout.STAGING_DIR).exists() or not any(
        (built / layout.STAGING_DIR).iterdir()
    )  # the downloads went with the staging area


def test_the_service_serves_a_pacs_image_from_the_pacs_and_404s_when_it_cannot(built, tmp_path):
    row = rows_by_sop(built)[CXR_STUDY + ".1.1"]
    path = indexed_file(row)
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == row["sha256"] and data[128:132] == b"DICM"
    assert indexed_file(row) == path  # fetched once, then served from the local copy
    gone = {**row, "sha256": "0" * 64, "source": f"http://127.0.0.1:{free_port()}/dicom-web"}
    with pytest.raises(NotFound) as caught:
        indexed_file(gone)
    assert status_of_error(caught.value) == 404 and "cannot be reached" in caught.value.message


def test_an_unreachable_pacs_is_a_clear_error_and_nothing_is_published(
    bundle_dir, tmp_path, capsys
):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    root = tmp_path / "root"
    command = ["build", "--model", str(bundle_dir), "--dicomweb", url, "--out", str(root)]
    assert cli.main([*command, "--pacs-timeout", "2", *JOB_ARGS]) == 1
    error = capsys.readouterr().err
    assert f"the PACS at {url} cannot be reached" in error and "Traceback" not in error
    assert layout.read_current(root) is None


# -- sync ------------------------------------------------------------------------------------------


def test_sync_adds_new_studies_removes_deleted_ones_and_a_rerun_changes_nothing(
    built, loaded, bundle_dir, datasets, tmp_path
):
    root = copy_root(built, tmp_path / "root")
    settings = pacs(loaded)
    first = sync_pacs(root, bundle_dir, settings, OPTIONS)
    assert not first.published and layout.list_versions(root) == ["000001"]

    covid = sorted((datasets / "covid-cxr" / "images").glob("*.jpg"))
    tags = study_tags("P-NEW", "20240201", "ACC-NEW")
    loaded.store(
        [
            wrap_jpeg(
                covid[2],
                NEW_STUDY,
                NEW_STUDY + ".1",
                NEW_STUDY + ".1.1",
                Modality="CR",
                ViewPosition="AP",
                BodyPartExamined="CHEST",
                **tags,
            ),
            structured_report(
                NEW_STUDY, NEW_STUDY + ".9.1", ["Right basal consolidation."], **tags
            ),
            # the report of a study indexed without one, finished later
            structured_report(
                MR_SMALL_STUDY,
                UID_ROOT + "5.1",
                ["Normal brain MR."],
                **study_tags("4MR1", "20040826", ""),
            ),
        ]
    )
    added = sync_pacs(root, bundle_dir, settings, OPTIONS)
    assert added.published and added.version == "000002" and added.count == IMAGES + 1
    assert added.changes["embedded"] == 1 and added.changes["structured_reports"] == 2
    assert added.changes["reports_filled"] == 1
    rows = rows_by_sop(root)
    new_row = rows[NEW_STUDY + ".1.1"]
    assert new_row["report"] == "Right basal consolidation." and new_row["view"] == "AP"
    mr = next(r for r in rows.values() if r["meta"]["StudyInstanceUID"] == MR_SMALL_STUDY)
    assert mr["report"] == "Normal brain MR."
    # the report sentences follow: the new study's, and the one filled in later (embedded by sync)
    assert sentence_links(root)["Right basal consolidation."] == {new_row["id"]}
    assert mr["id"] in sentence_links(root)["Normal brain MR."]
    again = sync_pacs(root, bundle_dir, settings, OPTIONS)
    assert not again.published and layout.read_current(root) == "000002"

    loaded.delete_study(CT_SMALL_STUDY)
    with pytest.raises(DicomwebError, match="no longer lists 1 of the"):
        sync_pacs(root, bundle_dir, replace(settings, max_removal=0.0), OPTIONS)
    removed = sync_pacs(root, bundle_dir, settings, OPTIONS)
    assert removed.published and removed.count == IMAGES and removed.changes["removed"] == 1
    assert all(r["meta"]["StudyInstanceUID"] != CT_SMALL_STUDY for r in rows_by_sop(root).values())
    indexed = {r["id"] for r in rows_by_sop(root).values()}
    assert set().union(*sentence_links(root).values()) <= indexed  # removed with their images
    assert not sync_pacs(root, bundle_dir, settings, OPTIONS).published
    # without the change feed (a QIDO listing, as for any DICOMweb server) the index is current too
    assert not sync_pacs(root, bundle_dir, replace(settings, feed="qido"), OPTIONS).published
    with open_current(root) as store:
        assert store.info["operation"] == "sync" and store.info["parent"] == "000002"


def test_a_sync_cut_off_mid_way_keeps_the_old_version_and_a_rerun_completes(
    built, loaded, bundle_dir, datasets, tmp_path, monkeypatch
):
    root = copy_root(built, tmp_path / "root")
    medpix = sorted((datasets / "medpix" / "images").glob("*.jpg"))
    tags = study_tags("P-LATE", "20240301", "ACC-LATE")
    loaded.store(
        [
            wrap_jpeg(
                medpix[1 + n],
                LATE_STUDY,
                LATE_STUDY + ".1",
                f"{LATE_STUDY}.1.{n}",
                Modality="CT",
                BodyPartExamined="HEAD",
                **tags,
            )
            for n in range(1, 4)
        ]
    )
    real, calls = download.retrieve, []

    def flaky(client, instance):
        calls.append(instance.sop)
        if len(calls) > 2:
            raise requests.ConnectionError("connection reset by peer")
        return real(client, instance)

    monkeypatch.setattr(download, "retrieve", flaky)
    settings = replace(pacs(loaded), threads=1)
    with pytest.raises(DicomwebError, match="Nothing was published"):
        sync_pacs(root, bundle_dir, settings, OPTIONS)
    assert layout.list_versions(root) == ["000001"] and layout.read_current(root) == "000001"
    monkeypatch.setattr(download, "retrieve", real)
    done = sync_pacs(root, bundle_dir, settings, OPTIONS)
    assert done.published and done.changes["fetch_resumed"] == 2
    late = [r for r in rows_by_sop(root).values() if r["meta"]["StudyInstanceUID"] == LATE_STUDY]
    assert len(late) == 3 and {r["meta"]["BodyPartExamined"] for r in late} == {"HEAD"}
    assert not sync_pacs(root, bundle_dir, settings, OPTIONS).published


def test_sync_cli_explains_itself_and_add_fetches_only_what_the_index_lacks(
    built, loaded, bundle_dir, tmp_path, capsys
):
    with pytest.raises(SystemExit):
        cli.main(["sync", "--help"])
    assert "--dicomweb" in capsys.readouterr().out
    root = copy_root(built, tmp_path / "root")
    command = ["add", "--root", str(root), "--model", str(bundle_dir), "--dicomweb", loaded.url]
    assert cli.main([*command, "--modality", "CT", *JOB_ARGS]) == 0
    out = capsys.readouterr().out
    assert "add: version 000002" in out
    report = report_of(root)
    assert report["counts"]["already_indexed_not_fetched"] >= 1
    assert all("/instances/" in path for path in report["added"])
    sync = ["sync", "--root", str(root), "--model", str(bundle_dir), "--dicomweb", loaded.url]
    assert cli.main([*sync, *JOB_ARGS]) == 0  # catches up with what the earlier tests changed
    assert cli.main([*sync, *JOB_ARGS]) == 0
    assert "sync: nothing changed; version 000003" in capsys.readouterr().out.splitlines()[-1]
