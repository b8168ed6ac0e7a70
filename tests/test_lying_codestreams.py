"""Issue 21, item 3: the decode budget trusted the DICOM header, the decoders trust the codestream.

A 1 KB DICOM whose header says 256x256 over a JPEG 2000 codestream whose SIZ says 12000x12000 made
openjpeg allocate 700 MB; a 4.7 MB one over a 20000x20000 baseline JPEG made libjpeg allocate
1.9 GB, in the server and in the indexer alike. Now every encapsulated frame, and every JPEG,
JPEG 2000 or PNG file, is budgeted by its codestream's own frame header before a decoder runs
(convirt.codestreams, convirt.decode_budget).

The files are crafted in memory (tests/lying_files.py): no large file is stored.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import test_service
from conftest import INDEX_OPTIONS, error_of, server_settings, serving
from indexer_rss import IndexerRuns
from lying_files import (
    black_jpeg,
    encapsulated_dicom,
    jp2_file,
    lying_j2k,
    segment,
)
from lying_files import lying_files as crafted_lying_files
from openjpeg.utils import encode_array
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from serving import ServerProcess
from test_service import result_ids, search_text, upload

from convirt.imageio import ImageDecodeError, ImageTooLargeError, load_image
from index import layout
from index.sources.manifest import read_manifest
from index.write.build import build

# test_service's module fixtures, registered here too; this module's index (a few images, quick to
# build) and server (the default settings: uploads up to 20 MB, as the probe's) are defined below,
# and conftest's client talks to that server
bundle, rows = test_service.bundle, test_service.rows

MB = 1_000_000
# What the issue allows the server's (or the indexer's) memory to move by, before, during (peak)
# and after refusing the lying files (before the fix: +700 MB and +1.9 GB at the peak).
RSS_SLACK = 150 * MB
# --workers 1: images decoded in the indexer process, where its peak RSS is read
BUILD_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def lying_files() -> dict[str, bytes]:
    return crafted_lying_files()


def servable(files: dict[str, bytes]) -> dict[str, bytes]:
    """Those the service takes as uploads and the indexer lists (DICOM, JPEG; not JPEG 2000)."""
    return {name: data for name, data in files.items() if Path(name).suffix in (".dcm", ".jpg")}


def content_type(name: str) -> str:
    return "application/dicom" if name.endswith(".dcm") else "image/jpeg"


def reset_peak_rss(pid: int | str) -> None:
    """Start the process's VmHWM afresh from its current RSS (Linux: /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_of(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


# -- in process: refused from the codestream, before any decoder runs ------------------------------


def refuse_quickly(data: bytes) -> ImageTooLargeError:
    reset_peak_rss("self")
    before = memory_of("self", "VmRSS")
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as refused:
        load_image(data)
    assert time.perf_counter() - started < 1
    assert memory_of("self", "VmHWM") - before < RSS_SLACK
    return refused.value


def test_lying_jpeg2000_dicom_is_refused_before_decoding(lying_files):
    data = lying_files["j2k_says_12000_header_256.dcm"]
    assert len(data) < 2_000
    error = refuse_quickly(data)
    assert "12000x12000" in str(error) and "256x256" in str(error), error


def test_lying_jpeg_dicom_is_refused_before_decoding(lying_files):
    data = lying_files["jpeg_says_20000_header_256.dcm"]
    error = refuse_quickly(data)
    assert "20000x20000" in str(error) and "256x256" in str(error), error


def test_lying_codestreams_as_plain_files_are_refused_before_decoding(lying_files, tmp_path):
    for name in ("jpeg_20000.jpg", "j2k_12000.j2k", "jp2_ihdr_256_siz_12000.jp2"):
        path = tmp_path / name
        path.write_bytes(lying_files[name])
        for source in (path, lying_files[name]):
            assert "pixels" in str(refuse_quickly(source)), name


def test_honest_codestreams_still_decode():
    jpeg = black_jpeg(256, 256, before_frame=segment(0xE0, b"JFIF\x00" + bytes(9)) + b"\x00\x00")
    assert load_image(jpeg).size == (256, 256)  # garbage before a marker is skipped, as libjpeg
    assert load_image(encapsulated_dicom(jpeg, JPEGBaseline8Bit)).size == (256, 256)
    ramp = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) % 251
    j2k = encode_array(ramp.astype(np.uint8), bits_stored=8)
    assert np.asarray(load_image(encapsulated_dicom(j2k, JPEG2000Lossless))).std() > 0
    assert load_image(jp2_file(j2k, 256, 256)).size == (256, 256)


def test_codestreams_that_hide_their_size_are_refused_with_a_reason():
    from convirt.codestreams import CodestreamError, read_codestream_size  # new in issue 21

    no_height = bytearray(black_jpeg(256, 256))
    sof = no_height.index(b"\xff\xc0")
    no_height[sof + 5 : sof + 7] = b"\x00\x00"  # height 0: given by a DNL marker after the scan
    with pytest.raises(CodestreamError, match="after the first scan"):
        read_codestream_size(bytes(no_height))
    with pytest.raises(ImageDecodeError, match="after the first scan"):
        load_image(encapsulated_dicom(bytes(no_height), JPEGBaseline8Bit))
    tiny_tiles = bytearray(lying_j2k(4000))
    siz = tiny_tiles.index(b"\xff\x51")
    struct.pack_into(">II", tiny_tiles, siz + 22, 1, 1)  # 16 million 1x1 tiles
    with pytest.raises(ImageDecodeError, match="tiles"):
        load_image(encapsulated_dicom(bytes(tiny_tiles), JPEG2000Lossless, side=4000))
    with pytest.raises(ImageDecodeError, match="does not start like"):
        load_image(encapsulated_dicom(b"\x00" * 64 + black_jpeg(256, 256), JPEGBaseline8Bit))
    # an encapsulated syntax whose codestream we cannot read is not handed to a decoder
    mpeg = encapsulated_dicom(b"\x00\x00\x01\xb3" + b"\x00" * 60, "1.2.840.10008.1.2.4.100")
    with pytest.raises(ImageDecodeError, match="not one we decode"):
        load_image(mpeg)


def test_a_real_jpeg_ls_dicom_is_budgeted_by_its_sof55():
    from convirt.codestreams import read_codestream_size  # new in issue 21

    path = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small_jpeg_ls_lossless.dcm"
    ds = pydicom.dcmread(path)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    size = read_codestream_size(frame)
    assert size is not None and size.kind == "JPEG-LS"
    assert (size.width, size.height, size.bits) == (ds.Columns, ds.Rows, ds.BitsStored)


# -- a real `convirt index build`, started first: it runs beside the server's start below ---------


@dataclass
class IndexerBuilds:
    honest: Path  # the index of two real images
    mixed: Path  # of the same two and the lying files
    indexer: IndexerRuns


@pytest.fixture(scope="module")
def indexer_builds(bundle_dir, rows, lying_files, tmp_path_factory) -> Iterator[IndexerBuilds]:
    """`convirt index build` of two honest images, then of the same two and the lying files,
    in one process of its own (its peak RSS read for each build), started at once: it imports
    torch while this module's server starts. --workers 1: decoded in that process."""
    folder = tmp_path_factory.mktemp("indexer")
    honest, mixed = folder / "honest", folder / "mixed"
    for images in (honest, mixed):
        images.mkdir()
        for row in rows[:2]:
            (images / Path(row["image"]).name).write_bytes(Path(row["image"]).read_bytes())
    for name, data in servable(lying_files).items():
        (mixed / name).write_bytes(data)
    command = ["build", "--model", str(bundle_dir), *BUILD_ARGS]
    runs = [[*command, "--images", str(d), "--out", str(d) + "_root"] for d in (honest, mixed)]
    indexer = IndexerRuns(runs, folder, timeout=300)
    try:
        yield IndexerBuilds(folder / "honest_root", folder / "mixed_root", indexer)
    finally:
        indexer.close()


# -- a real `convirt serve`: 413s, and memory within 150 MB before, during and after ---------------


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle, rows) -> Path:
    folder = tmp_path_factory.mktemp("index")
    manifest = read_manifest(test_service.write_manifest(folder / "m.csv", rows[:6]))
    build(folder / "root", bundle, manifest, replace(INDEX_OPTIONS, workers=1))  # no process pool
    return folder / "root"


@pytest.fixture(scope="module")
def server(indexer_builds, bundle_dir, index_root) -> Iterator[ServerProcess]:
    with serving(server_settings(bundle_dir, index_root)) as process:
        indexer_builds.indexer.results()  # ended: the server's test runs alone
        yield process


def test_lying_dicoms_are_refused_by_the_server_with_its_memory_unmoved(
    server, client, rows, lying_files
):
    jpeg = Path(rows[0]["image"]).read_bytes()
    assert len(result_ids(upload(client, "a.jpg", jpeg, "image/jpeg"))) == 5  # warmed up
    pid = server.process.pid
    reset_peak_rss(pid)
    before = memory_of(pid, "VmRSS")
    for name, data in servable(lying_files).items():
        error = error_of(upload(client, name, data, content_type(name)), 413, "too_many_pixels")
        assert "codestream" in error["message"], (name, error)
    # the two DICOMs twice each at once, with a text query among them: it is not held up
    with ThreadPoolExecutor(4) as pool:
        dicoms = [(n, d) for n, d in lying_files.items() if n.endswith(".dcm")] * 2
        hostile = [pool.submit(upload, client, n, d, content_type(n)) for n, d in dicoms]
        started = time.perf_counter()
        assert search_text(client, "pleural effusion").status_code == 200
        text_s = time.perf_counter() - started
        for future in hostile:
            error_of(future.result(), 413, "too_many_pixels")
    assert text_s < 2, f"a text query took {text_s:.1f} s beside the lying uploads"
    peak, after = memory_of(pid, "VmHWM"), memory_of(pid, "VmRSS")
    print(f"server RSS {before / MB:.0f} MB, peak {peak / MB:.0f}, after {after / MB:.0f}")
    assert peak - before < RSS_SLACK, f"peak RSS {before / MB:.0f} -> {peak / MB:.0f} MB"
    assert abs(after - before) < RSS_SLACK, f"RSS {before / MB:.0f} -> {after / MB:.0f} MB"
    assert client.get("/healthz").status_code == 200


# -- the indexer's builds (started above): the lying files are listed skips, memory bounded -------


def test_lying_files_are_skipped_by_the_indexer_with_its_memory_bounded(
    indexer_builds, lying_files
):
    # the honest build first, in the same process: the mixed one's peak is measured against it
    runs = indexer_builds.indexer.results()
    assert [code for code, _, _ in runs] == [0, 0], (runs, indexer_builds.indexer.why())
    honest_peak, mixed_peak = (kib * 1024 for _, kib, _ in runs)
    report = json.loads(
        (layout.current_version_dir(indexer_builds.mixed) / "build_report.json").read_text()
    )
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(servable(lying_files)), skipped
    assert all("codestream" in reason for reason in skipped.values()), skipped
    assert report["counts"]["embedded"] == 2
    growth = mixed_peak - honest_peak
    print(f"indexer peak RSS {honest_peak / MB:.0f} MB honest, {mixed_peak / MB:.0f} MB mixed")
    assert growth < RSS_SLACK, f"indexer peak RSS {honest_peak / MB:.0f} -> {mixed_peak / MB:.0f}"
