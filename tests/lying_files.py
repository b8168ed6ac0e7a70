"""Crafted image files that lie about their size (issue 21, item 3), made in memory in a moment:
for tests/test_lying_codestreams.py, tests/test_hostile_decode.py and bench/lying_decode.py.

A valid all-black baseline JPEG of any size is a few bits per 8x8 block (20000x20000: 4.7 MB,
400 MB decoded); the lying JPEG 2000 is a real 256x256 codestream with its SIZ image size patched.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from openjpeg.utils import encode_array
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


# The standard luminance Huffman tables (ITU T.81 K.3): DC and AC, as DHT payloads.
DC_TABLE = b"\x00" + bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]) + bytes(range(12))
AC_TABLE = (
    b"\x10"
    + bytes([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D])
    + bytes.fromhex(
        "01020300041105122131410613516107227114328191a1082342b1c11552d1f024336272"
        "82090a161718191a25262728292a3435363738393a434445464748494a535455565758"
        "595a636465666768696a737475767778797a838485868788898a92939495969798999a"
        "a2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9"
        "dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9fa"
    )
)


def black_jpeg(width: int, height: int, before_frame: bytes = b"") -> bytes:
    """A valid greyscale baseline JPEG of width x height black pixels (sides multiples of 16):
    each 8x8 block is a DC difference of 0 ('00') and an end of block ('1010'), 6 bits, so four
    blocks are the 3 bytes 28 A2 8A. 20000x20000 is 4.7 MB and decodes to 400 MB."""
    blocks = (width // 8) * (height // 8)
    return (
        b"\xff\xd8"
        + before_frame
        + segment(0xDB, b"\x00" + bytes([1] * 64))
        + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + segment(0xC4, DC_TABLE)
        + segment(0xC4, AC_TABLE)
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + b"\x28\xa2\x8a" * (blocks // 4)
        + b"\xff\xd9"
    )


def lying_j2k(side: int) -> bytes:
    """A real 256x256 JPEG 2000 codestream whose SIZ says the image is side x side (its 256x256
    tiles unchanged): openjpeg allocates the whole declared image before finding the tiles
    missing."""
    codestream = bytearray(encode_array(np.zeros((256, 256), np.uint8), bits_stored=8))
    siz = codestream.index(b"\xff\x51")
    struct.pack_into(">II", codestream, siz + 6, side, side)  # Xsiz, Ysiz
    return bytes(codestream)


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def jp2_file(codestream: bytes, width: int, height: int) -> bytes:
    """A JP2 file whose ihdr box says width x height, around `codestream`."""
    ihdr = struct.pack(">IIHBBBB", height, width, 1, 7, 7, 0, 0)
    header = box(b"jp2h", box(b"ihdr", ihdr) + box(b"colr", b"\x01\x00\x00\x00\x00\x00\x11"))
    return (
        box(b"jP  ", b"\r\n\x87\n")
        + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        + header
        + box(b"jp2c", codestream)
    )


def encapsulated_dicom(
    frame: bytes | list[bytes], syntax: str, side: int = 256, bits: int = 8
) -> bytes:
    """A greyscale DICOM of `bits` bits whose header says side x side, with `frame` as its one
    encapsulated frame (a list: a multi-frame DICOM of those frames, NumberOfFrames set)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows = ds.Columns = side
    if isinstance(frame, list):
        ds.NumberOfFrames = len(frame)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate(frame if isinstance(frame, list) else [frame])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def lying_files() -> dict[str, bytes]:
    """The probe's two DICOMs (headers 256x256), and the same codestreams as plain files."""
    jpeg, j2k = black_jpeg(20_000, 20_000), lying_j2k(12_000)
    return {
        "j2k_says_12000_header_256.dcm": encapsulated_dicom(j2k, JPEG2000Lossless),
        "jpeg_says_20000_header_256.dcm": encapsulated_dicom(jpeg, JPEGBaseline8Bit),
        "jpeg_20000.jpg": jpeg,
        "j2k_12000.j2k": j2k,
        "jp2_ihdr_256_siz_12000.jp2": jp2_file(j2k, 256, 256),
    }
