"""The dimensions an image codestream gives itself, read before anything decodes it.

A DICOM header's Rows and Columns say how large a frame is, but the JPEG, JPEG-LS or JPEG 2000
decoder that pydicom hands the frame to allocates whatever the codestream's own frame header
says: a 1 KB file whose header says 256x256 and whose JPEG 2000 SIZ says 12000x12000 made the
decoder allocate 700 MB, a 4.7 MB one with a 20000x20000 baseline JPEG 1.9 GB (issue 21, item 3).
So convirt.imageio reads the codestream's own frame header here (JPEG SOFn, JPEG-LS SOF55, JPEG
2000 SIZ in a raw codestream or a JP2 file's jp2c box, PNG IHDR) and budgets by that.

The parsers are small and bounded: they read headers only, skip every other segment or box by
seeking, give up after MAX_SEGMENTS segments or MAX_SKIPPED_BYTES bytes of garbage between
segments, and raise CodestreamError (not an IndexError or struct.error) for anything they cannot
read, so a refusal always has a reason.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

MAX_SEGMENTS = 1024  # markers or boxes read before giving up on finding the frame header
MAX_SKIPPED_BYTES = 1 << 16  # garbage bytes skipped between JPEG markers (as libjpeg does)

JPEG_MAGIC = b"\xff\xd8\xff"
J2K_MAGIC = b"\xff\x4f\xff\x51"  # SOC, then SIZ (always the first marker segment)
JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # the JP2 signature box
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (ITU T.81 B.1.1.3): SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC); DHP
# (DE), which gives a hierarchical image's size before its frames; JPEG-LS SOF55 (F7).
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8), 0xD8])
JPEG_SOS, JPEG_EOI = 0xDA, 0xD9
# The most JPEG 2000 tiles a codestream may have (the standard's limit, which openjpeg applies).
J2K_MAX_TILES = 65_535
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


class CodestreamError(ValueError):
    """The codestream's frame header is missing, malformed or not where it must be."""


@dataclass(frozen=True)
class CodestreamSize:
    """What a codestream's frame header says it decodes to."""

    kind: str  # "JPEG", "JPEG-LS", "JPEG 2000" or "PNG"
    width: int
    height: int
    components: int
    bits: int  # the largest sample precision
    # samples per component, for JPEG 2000's sub-sampled components (else width x height each)
    component_samples: tuple[int, ...] = ()

    @property
    def samples(self) -> int:
        """Samples over all components (what a decoder fills)."""
        if self.component_samples:
            return sum(self.component_samples)
        return self.width * self.height * self.components

    def describe(self) -> str:
        return f"{self.kind} codestream of {self.width}x{self.height} pixels x {self.components}"


def read_codestream_size(data: bytes | BinaryIO) -> CodestreamSize | None:
    """The frame header of a JPEG, JPEG-LS, JPEG 2000 (raw or JP2) or PNG stream, told apart by
    its first bytes; None when it starts like none of them. A stream is read from where it is and
    left there."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    start = stream.tell()
    try:
        head = stream.read(len(JP2_MAGIC))
        stream.seek(start)
        if head.startswith(JPEG_MAGIC):
            return read_jpeg_size(stream)
        if head.startswith(J2K_MAGIC):
            return read_j2k_size(stream)
        if head.startswith(JP2_MAGIC):
            return read_jp2_size(stream)
        if head.startswith(PNG_MAGIC):
            return read_png_size(stream)
        return None
    finally:
        stream.seek(start)


def _read_exactly(stream: BinaryIO, count: int, what: str) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise CodestreamError(f"the stream ends inside its {what}")
    return data


def read_jpeg_size(stream: BinaryIO) -> CodestreamSize:
    """The largest frame (SOFn, DHP or SOF55) a JPEG or JPEG-LS stream declares before its first
    scan: libjpeg allocates by its frame header, whatever any container says."""
    if _read_exactly(stream, 2, "start of image") != b"\xff\xd8":
        raise CodestreamError("a JPEG stream must start with an SOI marker (FFD8)")
    frames: list[CodestreamSize] = []
    skipped = 0
    for _ in range(MAX_SEGMENTS):
        byte = _read_exactly(stream, 1, "marker")
        while byte != b"\xff":  # garbage before a marker: libjpeg and Pillow skip it too
            skipped += 1
            if skipped > MAX_SKIPPED_BYTES:
                raise CodestreamError(
                    f"over {MAX_SKIPPED_BYTES:,} bytes of garbage between markers"
                )
            byte = _read_exactly(stream, 1, "marker")
        marker = _read_exactly(stream, 1, "marker")[0]
        while marker == 0xFF:  # fill bytes
            marker = _read_exactly(stream, 1, "marker")[0]
        if marker in JPEG_STANDALONE_MARKERS or marker == 0x00:
            continue
        if marker in (JPEG_SOS, JPEG_EOI):
            break
        (length,) = struct.unpack(">H", _read_exactly(stream, 2, "segment length"))
        if length < 2:
            raise CodestreamError(f"JPEG segment FF{marker:02X} has length {length}")
        if marker not in JPEG_FRAME_MARKERS:
            stream.seek(length - 2, io.SEEK_CUR)
            continue
        frames.append(_jpeg_frame(marker, _read_exactly(stream, length - 2, "frame header")))
    else:
        raise CodestreamError(f"no JPEG scan within the first {MAX_SEGMENTS} segments")
    if not frames:
        raise CodestreamError("the JPEG stream has no frame header (SOFn) before its first scan")
    return max(frames, key=lambda frame: frame.samples * frame.bits)


def _jpeg_frame(marker: int, segment: bytes) -> CodestreamSize:
    if len(segment) < 6:
        raise CodestreamError(f"JPEG frame header FF{marker:02X} is {len(segment)} bytes long")
    bits, height, width, components = struct.unpack(">BHHB", segment[:6])
    kind = "JPEG-LS" if marker == 0xF7 else "JPEG"
    if width == 0 or height == 0:
        # the size is given later (a DNL or LSE marker): nothing to budget by before decoding
        raise CodestreamError(
            f"the {kind} frame header gives a size of {width}x{height}: a size given only "
            "after the first scan is not supported"
        )
    return CodestreamSize(kind, width, height, max(1, components), bits)


def read_j2k_size(stream: BinaryIO) -> CodestreamSize:
    """The image a raw JPEG 2000 codestream declares in its SIZ segment (ISO 15444-1 A.5.1)."""
    head = _read_exactly(stream, 6, "SIZ marker")
    if head[:4] != J2K_MAGIC:
        raise CodestreamError("a JPEG 2000 codestream must start with SOC then SIZ (FF4F FF51)")
    (length,) = struct.unpack(">H", head[4:])
    fixed = _read_exactly(stream, 36, "SIZ segment")
    _, xsiz, ysiz, x_offset, y_offset, tile_w, tile_h, tile_x, tile_y, count = struct.unpack(
        ">HIIIIIIIIH", fixed
    )
    if count == 0 or length != 38 + 3 * count:
        raise CodestreamError(f"JPEG 2000 SIZ segment of length {length} for {count} components")
    if xsiz <= x_offset or ysiz <= y_offset or tile_w == 0 or tile_h == 0:
        raise CodestreamError(
            f"JPEG 2000 SIZ gives an empty image or tile ({xsiz}x{ysiz} from offset "
            f"{x_offset},{y_offset}, tiles {tile_w}x{tile_h})"
        )
    if tile_x > x_offset or tile_y > y_offset or tile_x + tile_w <= x_offset:
        raise CodestreamError("JPEG 2000 SIZ: the first tile does not cover the image origin")
    if tile_y + tile_h <= y_offset:
        raise CodestreamError("JPEG 2000 SIZ: the first tile does not cover the image origin")
    tiles = _ceil_div(xsiz - tile_x, tile_w) * _ceil_div(ysiz - tile_y, tile_h)
    if tiles > J2K_MAX_TILES:
        raise CodestreamError(f"JPEG 2000 SIZ declares {tiles:,} tiles (at most {J2K_MAX_TILES:,})")
    components = _read_exactly(stream, 3 * count, "SIZ component list")
    samples, bits = [], 0
    for n in range(count):
        precision, x_step, y_step = components[3 * n : 3 * n + 3]
        if x_step == 0 or y_step == 0:
            raise CodestreamError(f"JPEG 2000 component {n} has a sub-sampling of 0")
        bits = max(bits, (precision & 0x7F) + 1)
        width = _ceil_div(xsiz, x_step) - _ceil_div(x_offset, x_step)
        height = _ceil_div(ysiz, y_step) - _ceil_div(y_offset, y_step)
        samples.append(width * height)
    return CodestreamSize(
        "JPEG 2000", xsiz - x_offset, ysiz - y_offset, count, bits, tuple(samples)
    )


def read_jp2_size(stream: BinaryIO) -> CodestreamSize:
    """The SIZ of the codestream in a JP2 file's jp2c box: what openjpeg decodes, whatever the
    file's ihdr box says."""
    for _ in range(MAX_SEGMENTS):
        header = stream.read(8)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I4s", header)
        if length == 1:
            (length,) = struct.unpack(">Q", _read_exactly(stream, 8, "box length"))
            body = length - 16
        else:
            body = length - 8
        if kind == b"jp2c":
            return read_j2k_size(stream)
        if length == 0:  # the last box runs to the end of the file
            break
        if body < 0:
            raise CodestreamError(f"JP2 box {kind!r} has length {length}")
        stream.seek(body, io.SEEK_CUR)
    raise CodestreamError(f"no JPEG 2000 codestream box (jp2c) within {MAX_SEGMENTS} boxes")


def read_png_size(stream: BinaryIO) -> CodestreamSize:
    """The size a PNG's IHDR chunk gives (always the first chunk)."""
    head = _read_exactly(stream, 8 + 8 + 13, "IHDR chunk")
    if head[:8] != PNG_MAGIC or head[12:16] != b"IHDR":
        raise CodestreamError("a PNG must start with its signature and then an IHDR chunk")
    width, height, bits, colour = struct.unpack(">IIBB", head[16:26])
    if width == 0 or height == 0 or colour not in PNG_CHANNELS:
        raise CodestreamError(f"PNG IHDR gives {width}x{height} pixels of colour type {colour}")
    return CodestreamSize("PNG", width, height, PNG_CHANNELS[colour], bits)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
