"""Hostile uploads and files (issue 10, items 2 and 4), against a real `convirt serve` process and a
real `convirt index build`.

Item 2: tiny files whose headers promise gigabytes of pixels (a 10000x10000x12-frame JPEG 2000
DICOM of a few KB, 10000x10000 16-bit and RGBA PNGs) are refused from their headers, cheaply,
with a 413 JSON error; a large multi-frame DICOM has one frame decoded, not all of them.
Item 4: a DICOM whose window or modality LUT is unusable is an undecodable image (422 on the API,
a listed skip in a build), never a 500 or an aborted build.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import test_service
from conftest import error_of
from lying_files import encapsulated_dicom
from openjpeg.utils import encode_array
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid
from test_imageio import dicom_variant, empty_modality_lut, text_window, zero_window_width
from test_service import DICOM_FILES, png_chunk, result_ids, upload

from index import layout

# test_service's module fixtures, registered here too: this module gets its own index and server
bundle, rows, index_root = test_service.bundle, test_service.rows, test_service.index_root
server = test_service.server

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
# What the server may grow by, at its peak, while it refuses or decodes every crafted file below
# (before the fix: +2.3 GB for one such DICOM, +1.2 GB for one such PNG).
RSS_GROWTH_LIMIT = 400 * MB
BUILD_ARGS = ["--batch-size", "4", "--chunk-batches", "1", "--workers", "2", "--no-progress"]


# -- crafted files ---------------------------------------------------------------------------------


def j2k_dicom(side: int, frames: int, bits: int, broken_frames: bool = False) -> bytes:
    """A real JPEG 2000 multi-frame DICOM of side x side pixels per frame: all zeros, so each
    frame compresses to a few hundred bytes. broken_frames: every frame but the middle one is
    garbage (decoding it fails), so the file decodes only if the middle frame alone is decoded."""
    dtype = np.uint8 if bits == 8 else np.uint16
    frame = encode_array(np.zeros((side, side), dtype), bits_stored=bits)
    garbage = b"\xff\x4f\xff\x51" + b"\x00" * 60  # a codestream start, then nothing valid
    fragments = [frame if not broken_frames or n == frames // 2 else garbage for n in range(frames)]
    return encapsulated_dicom(fragments, JPEG2000Lossless, side, bits)


def constant_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A valid PNG of width x height zero pixels (colour type 0: grey, 6: RGBA), compressed to a
    few hundred KB at most: it decodes to width x height x samples x bit_depth / 8 bytes."""
    samples = {0: 1, 6: 4}[colour_type]
    row = b"\x00" * (1 + width * samples * bit_depth // 8)  # filter byte, then the pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def bad_dicoms() -> dict[str, bytes]:
    """CT_small.dcm with an unusable window or modality LUT (each raised out of the decoder)."""
    return {
        "window_width_0.dcm": dicom_variant(zero_window_width),
        "text_window.dcm": dicom_variant(text_window),
        "empty_modality_lut.dcm": dicom_variant(empty_modality_lut),
    }


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {
        "j2k_10000x10000x12.dcm": j2k_dicom(10_000, 12, 16),
        "grey16_10000x10000.png": constant_png(10_000, 10_000, 16, 0),
        "rgba_10000x10000.png": constant_png(10_000, 10_000, 8, 6),
    }


def content_type(name: str) -> str:
    return "application/dicom" if name.endswith(".dcm") else "image/png"


# -- item 2: tiny uploads that allocate gigabytes --------------------------------------------------


def test_tiny_uploads_that_allocate_gigabytes_are_refused_from_their_headers(
    server, client, rows, bombs
):
    jpeg = Path(rows[0]["image"]).read_bytes()
    assert len(result_ids(upload(client, "a.jpg", jpeg, "image/jpeg"))) == 5  # warmed up
    peak_before = server.peak_rss_bytes()
    assert max(len(data) for data in bombs.values()) < 400_000
    for name, data in bombs.items():
        started = time.perf_counter()
        error = error_of(upload(client, name, data, content_type(name)), 413, "too_many_pixels")
        assert "bytes once decoded" in error["message"], error
        assert time.perf_counter() - started < 5, name
    # all of them twice at once, with an ordinary upload among them: it is not held up
    with ThreadPoolExecutor(7) as pool:
        hostile = [
            pool.submit(upload, client, name, data, content_type(name))
            for name, data in [*bombs.items(), *bombs.items()]
        ]
        started = time.perf_counter()
        ordinary = upload(client, "a.jpg", jpeg, "image/jpeg")
        ordinary_s = time.perf_counter() - started
        for future in hostile:
            error_of(future.result(), 413, "too_many_pixels")
    assert len(result_ids(ordinary)) == 5 and ordinary_s < 10
    growth = server.peak_rss_bytes() - peak_before
    assert growth < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / MB:.0f} MB"


def test_tiny_multi_frame_dicom_has_only_one_frame_decoded(server, client):
    # 12 frames of 4000x4000: within the byte budget per frame; every frame but the middle one
    # is garbage, so only a decoder that decodes the middle frame alone can succeed
    data = j2k_dicom(4000, 12, 8, broken_frames=True)
    assert len(data) < 10_000
    peak_before = server.peak_rss_bytes()
    started = time.perf_counter()
    response = upload(client, "frames.dcm", data, "application/dicom")
    assert len(result_ids(response)) == 5 and time.perf_counter() - started < 15
    growth = server.peak_rss_bytes() - peak_before
    assert growth < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / MB:.0f} MB"


# -- item 4: one bad DICOM aborts a whole build ----------------------------------------------------


def test_one_bad_dicom_gets_a_422_not_a_500(client):
    for name, data in bad_dicoms().items():
        error = error_of(upload(client, name, data, "application/dicom"), 422, "undecodable_image")
        assert "DICOM" in error["message"], (name, error)
    assert client.get("/healthz").status_code == 200


def test_one_bad_dicom_does_not_abort_a_whole_build(bundle_dir, rows, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for row in rows[:2]:
        (images / Path(row["image"]).name).write_bytes(Path(row["image"]).read_bytes())
    (images / "CT_small.dcm").write_bytes((DICOM_FILES / "CT_small.dcm").read_bytes())
    bad = bad_dicoms()
    for name, data in bad.items():
        (images / name).write_bytes(data)
    root = tmp_path / "root"
    command = ["index", "build", "--model", str(bundle_dir), "--images", str(images)]
    command += ["--out", str(root), *BUILD_ARGS]
    done = subprocess.run(
        [sys.executable, "-m", "convirt.cli", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((layout.current_version_dir(root) / "build_report.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(bad)
    assert all("DICOM" in reason for reason in skipped.values()), skipped
    assert report["counts"]["embedded"] == 3 and report["counts"]["skipped"] == 3


# -- issue 21, finding 3's neighbours: RLE and deflate expand without bound inside pydicom -----------

PEAK_RSS_SCRIPT = """
import resource, sys
from convirt.imageio import ImageTooLargeError, load_image
honest, bomb = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
load_image(honest)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_image(bomb)
    outcome = "decoded"
except ImageTooLargeError as err:
    outcome = "too large: " + str(err)
except Exception as err:
    outcome = type(err).__name__ + ": " + str(err)
print(outcome)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def meta_and_dataset(syntax: str, rows: int = 256) -> tuple[bytes, Dataset]:
    """A Part-10 file's preamble and file meta (in `syntax`), and a 8-bit greyscale dataset."""
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    head = io.BytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return head.getvalue(), ds


def rle_bomb(decoded_mb: int) -> bytes:
    """A 256x256 RLE DICOM whose one segment decodes to `decoded_mb` MB: a run of 128 zeros per
    two input bytes, where 65,536 bytes are all the header allows."""
    from pydicom.uid import RLELossless

    ds = meta_and_dataset(RLELossless)[1]
    runs = decoded_mb * 1_000_000 // 128
    frame = struct.pack("<16I", 1, 64, *[0] * 14) + b"\x81\x00" * runs
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflate_bomb(inflated_mb: int) -> bytes:
    """A deflated DICOM whose dataset inflates to `inflated_mb` MB: a 256x256 header, then a
    PixelData element that long, all zeros (about 1 KB of deflate per MB)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    head = meta_and_dataset(DeflatedExplicitVRLittleEndian)[0]

    def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", group, number, vr, len(value)) + value

    size = inflated_mb * 1_000_000
    dataset = b"".join(
        [
            element(0x0028, 0x0002, b"US", struct.pack("<H", 1)),
            element(0x0028, 0x0004, b"CS", b"MONOCHROME2 "),
            element(0x0028, 0x0010, b"US", struct.pack("<H", 256)),
            element(0x0028, 0x0011, b"US", struct.pack("<H", 256)),
            element(0x0028, 0x0100, b"US", struct.pack("<H", 8)),
            element(0x0028, 0x0101, b"US", struct.pack("<H", 8)),
            element(0x0028, 0x0102, b"US", struct.pack("<H", 7)),
            element(0x0028, 0x0103, b"US", struct.pack("<H", 0)),
            struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", size),
        ]
    )
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(dataset)]
    zeros = b"\x00" * 10_000_000
    for _ in range(inflated_mb // 10):
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    return head + b"".join(parts)


@pytest.mark.parametrize(
    "name, bomb", [("rle", lambda: rle_bomb(256)), ("deflate", lambda: deflate_bomb(300))]
)
def test_rle_and_deflate_bombs_are_refused_before_they_expand(tmp_path, name, bomb):
    """1 KB of deflate makes 1 MB, two bytes of RLE 128: a deflated DICOM of 0.3 MB took 169 MB
    more at its peak and was decoded; the RLE one was decoded too (the installed decoder bounds
    its buffer, pydicom's own would not). Both are now refused before they expand."""
    data = bomb()
    assert len(data) < 5 * MB
    honest = tmp_path / "honest.dcm"
    honest.write_bytes(j2k_dicom(64, 1, 8))
    (tmp_path / "bomb.dcm").write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(honest), str(tmp_path / "bomb.dcm")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    outcome, grown_mb = done.stdout.strip().splitlines()
    assert outcome.startswith("too large:") and "refused before" in outcome, outcome
    assert int(grown_mb) < 60, f"{name}: peak RSS grew by {grown_mb} MB ({outcome})"
