"""Decode budgets, enforced before anything is decoded: by a file's header, and by the frame header
of the codestream a decoder actually reads (convirt.codestreams).

A DICOM header's Rows and Columns bound what pydicom expects, but the JPEG or JPEG 2000 decoder it
calls allocates by the codestream's own SOF or SIZ: a 1 KB DICOM saying 256x256 over a 12000x12000
SIZ took 700 MB, a 4.7 MB one over a 20000x20000 JPEG 1.9 GB (issue 21, item 3). So every
encapsulated frame and every JPEG, JPEG 2000 or PNG file is budgeted by its codestream here, an
encapsulated syntax whose codestream we cannot read is not decoded at all, and what a failed
decoder freed is handed back to the system (trim_heap).
"""

from __future__ import annotations

import ctypes
import io
import logging
import math
import zlib
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from .codestreams import CodestreamError, read_codestream_size

log = logging.getLogger(__name__)

# Refuse decompression bombs: ~100 megapixels is far above any radiograph we expect.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# ...and any image whose decoded pixels take more than this many bytes (rows x columns x samples
# per pixel x bytes per sample, for the one frame we decode): a 100-megapixel 8-bit greyscale
# image, or a 50-megapixel 16-bit one, or a 25-megapixel RGBA one.
MAX_DECODED_BYTES = 100_000_000
# A JPEG whose shorter side is at least twice this is decoded scaled down by 2, 4 or 8, keeping
# the shorter side at least this long: far above the sides the model resizes to (256 or less),
# so what the model sees is unchanged in quality, for a fraction of the memory and time.
DRAFT_MIN_SIDE = 1024
# JPEG 2000 decoders work in 32-bit integers whatever the bit depth.
JPEG2000_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
JPEG2000_SYNTAXES |= {
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
# Encapsulated syntaxes whose frames we budget by their codestream's own header before decoding
# (convirt.codestreams): JPEG baseline, extended, lossless, lossless SV1; JPEG-LS; JPEG 2000.
JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)}
CODESTREAM_SYNTAXES = JPEG_SYNTAXES | JPEG2000_SYNTAXES
RLE_SYNTAX = "1.2.840.10008.1.2.5"  # segments checked to decode into the frame the header gives
# pydicom inflates a deflated dataset whole, unbounded, before it reads one element
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"


class ImageDecodeError(ValueError):
    """The input is not an image we can decode; the message says why."""


class ImageTooLargeError(ImageDecodeError):
    """The image would take more than MAX_PIXELS pixels or MAX_DECODED_BYTES bytes once decoded
    (a likely decompression bomb)."""


def draft_scale(width: int, height: int) -> int:
    """1, or the 2, 4 or 8 a JPEG of this size is decoded scaled down by (see _draft)."""
    shorter = min(width, height)
    return next((s for s in (8, 4, 2) if shorter >= s * DRAFT_MIN_SIDE), 1)


def check_size(what: str, width: int, height: int, pixel_bytes: int) -> None:
    """ImageTooLargeError unless width x height pixels of pixel_bytes each fit both budgets."""
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} pixels, above the {MAX_PIXELS:,} limit"
        )
    decoded = width * height * pixel_bytes
    if decoded > MAX_DECODED_BYTES:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} pixels of {pixel_bytes} byte(s): {decoded:,} bytes once "
            f"decoded, above the {MAX_DECODED_BYTES:,}-byte limit"
        )


def sample_bytes(bits: int) -> int:
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


def check_file_codestream(source: bytes | Path) -> None:
    """Budget a JPEG, JPEG 2000 or PNG file by its codestream's own frame header (what the
    decoder allocates by), before Pillow opens it. Other formats: Pillow's header check only."""
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as stream:
            size = read_codestream_size(stream)
    except OSError as err:
        raise ImageDecodeError(f"cannot read {source}: {err.strerror or err}") from err
    except CodestreamError as err:
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from err
    if size is None:
        return
    decoded = size.samples * sample_bytes(size.bits)
    if size.kind == "JPEG":  # libjpeg decodes a huge one scaled down (_draft)
        scale = draft_scale(size.width, size.height)
        scaled = math.ceil(size.width / scale) * math.ceil(size.height / scale)
        decoded = scaled * size.components * sample_bytes(size.bits)
    check_budget(size.describe(), size.width * size.height, decoded)


def check_budget(what: str, pixels: int, decoded: int) -> None:
    if pixels > MAX_PIXELS:
        raise ImageTooLargeError(f"{what} is {pixels:,} pixels, above the {MAX_PIXELS:,} limit")
    if decoded > MAX_DECODED_BYTES:
        raise ImageTooLargeError(
            f"{what} takes {decoded:,} bytes once decoded, above the "
            f"{MAX_DECODED_BYTES:,}-byte limit"
        )


def check_frame_codestream(ds, index: int, frames: int, rows: int, cols: int, samples: int):
    """ImageTooLargeError when the frame's codestream is larger than its DICOM header says, or
    over the budget itself; ImageDecodeError for a transfer syntax whose codestream we cannot
    read (so cannot budget) or a frame that is not such a codestream."""

    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax == RLE_SYNTAX:
        check_rle_frame(_frame(ds, index, frames), rows * cols, index)
        return
    if syntax not in CODESTREAM_SYNTAXES:
        raise ImageDecodeError(
            f"DICOM transfer syntax {syntax} ({ds.file_meta.TransferSyntaxUID.name}) is not one "
            "we decode: convert the file to uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000"
        )
    frame = _frame(ds, index, frames)
    try:
        size = read_codestream_size(frame)
    except CodestreamError as err:
        raise ImageDecodeError(f"DICOM frame {index}: unreadable codestream: {err}") from err
    if size is None or size.kind == "PNG":
        raise ImageDecodeError(
            f"DICOM frame {index} does not start like a {ds.file_meta.TransferSyntaxUID.name} "
            f"codestream (first bytes {frame[:4].hex()})"
        )
    if size.width > cols or size.height > rows or size.components > samples:
        raise ImageTooLargeError(
            f"DICOM frame {index} is a {size.describe()}, larger than the {cols}x{rows} "
            f"pixels x {samples} its header says: refused before decoding"
        )
    width = 4 if size.kind == "JPEG 2000" else sample_bytes(size.bits)  # openjpeg: int32
    check_budget(
        f"DICOM frame {index}, a {size.describe()},", size.width * size.height, size.samples * width
    )


def _frame(ds, index: int, frames: int) -> bytes:
    """The encapsulated bytes of one frame (ImageDecodeError: a broken item or offset table)."""
    from pydicom.encaps import get_frame

    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        return get_frame(ds.PixelData, index, number_of_frames=frames, extended_offsets=offsets)
    except Exception as err:  # pydicom raises many types here
        raise ImageDecodeError(f"DICOM frame {index} cannot be found: {err}") from err


def check_rle_frame(frame: bytes, segment_bytes: int, index: int = 0) -> None:
    """ImageTooLargeError when a segment of an RLE frame decodes to more bytes than the header's
    frame holds: pydicom's RLE decoder grows each segment without bound (2 input bytes make up
    to 128), so a 20 MB upload could take 1.3 GB. Counted without decoding, stopping at the cap."""
    if len(frame) < 64:
        raise ImageDecodeError(f"DICOM frame {index}: shorter than an RLE header (64 bytes)")
    count = int.from_bytes(frame[:4], "little")
    if not 1 <= count <= 15:
        raise ImageDecodeError(f"DICOM frame {index}: its RLE header says {count} segments")
    ends = [int.from_bytes(frame[4 + 4 * n : 8 + 4 * n], "little") for n in range(count)]
    ends.append(len(frame))
    cap = segment_bytes + 1  # a segment may end with one pad byte
    for n in range(count):
        if rle_length(memoryview(frame)[ends[n] : ends[n + 1]], cap) > cap:
            raise ImageTooLargeError(
                f"DICOM frame {index}: RLE segment {n} decodes to more than the {segment_bytes:,} "
                "bytes its header allows: refused before decoding"
            )


def rle_length(segment: memoryview, cap: int) -> int:
    """Bytes a PackBits segment decodes to, counted up to just past `cap`."""
    total = pos = 0
    end = len(segment)
    while pos < end and total <= cap:
        header = segment[pos]
        if header < 128:  # a literal run of header + 1 bytes
            total += header + 1
            pos += header + 2
        elif header > 128:  # the next byte, 257 - header times
            total += 257 - header
            pos += 2
        else:
            pos += 1
    return total


def check_deflated(fp: BinaryIO) -> None:
    """ImageTooLargeError when a Deflated Explicit VR dataset inflates past MAX_DECODED_BYTES:
    pydicom inflates it whole before reading a single element (1 MB of deflate makes 1 GB).
    Inflated here in 1 MB steps, kept nowhere; the file position is left where it was."""
    start = fp.tell()
    try:
        head = fp.read(144)
        # preamble, DICM, then (0002,0000) UL: the length of the rest of the file meta group
        if len(head) < 144 or head[128:136] != b"DICM\x02\x00\x00\x00":
            return
        meta_end = 144 + int.from_bytes(head[140:144], "little")
        if DEFLATED_SYNTAX.encode() not in fp.read(min(meta_end - 144, 1 << 16)):
            return
        fp.seek(start + meta_end)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while (chunk := fp.read(1 << 20)) and not inflater.eof:
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > MAX_DECODED_BYTES:
                    raise ImageTooLargeError(
                        f"the deflated DICOM dataset inflates to more than {MAX_DECODED_BYTES:,} "
                        "bytes: refused before reading it"
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error as err:
        raise ImageDecodeError(f"the deflated DICOM dataset cannot be inflated: {err}") from err
    finally:
        fp.seek(start)


def trim_heap() -> None:
    """Give freed heap pages back to the system: after a decoder fails, glibc would otherwise keep
    what it freed (and a released model tower's memory: docs/benchmarks.md, "Int8 query
    encoder"). Without glibc, nothing to do."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        log.debug("no malloc_trim here: freed memory stays with the process")
