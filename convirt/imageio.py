"""Decode PNG, JPEG and DICOM into 8-bit greyscale PIL images, with clear errors for bad input.

Decoding is bounded before it starts: a file's header, and the frame header of the codestream the
decoder reads (JPEG SOF, JPEG 2000 SIZ, PNG IHDR: convirt.decode_budget), say how many bytes its
pixels take once decoded, and anything above MAX_DECODED_BYTES, or a codestream larger than its
DICOM header says, is refused (ImageTooLargeError) without decoding.
A multi-frame DICOM has only the one frame we use decoded; a JPEG far larger than any side the
model uses is decoded at a reduced scale (libjpeg's DCT scaling, 1/2 to 1/8) that keeps its
shorter side at least DRAFT_MIN_SIDE; conversion to 8 bits works through a lookup table or in
strips of rows, never in whole-image float copies.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .decode_budget import (
    DRAFT_MIN_SIDE,
    JPEG2000_SYNTAXES,
    MAX_DECODED_BYTES,
    MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    check_deflated,
    check_file_codestream,
    check_frame_codestream,
    check_size,
    draft_scale,
    trim_heap,
)
from .imagerecord import header_fields

__all__ = [  # with the budget names convirt.decode_budget defines, imported from here
    "DECODER_REVISION",
    "DICOM_PREAMBLE",
    "DICOM_SUFFIXES",
    "DRAFT_MIN_SIDE",
    "IMAGE_SUFFIXES",
    "MAX_DECODED_BYTES",
    "MAX_PIXELS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "dicom_frame",
    "load_image",
    "looks_like_dicom",
    "read_dicom",
    "resize_shorter",
]


class _QuietPluginFailures(logging.Filter):
    """pydicom logs each decoder plugin that fails on a frame, with its traceback, then raises one
    error naming every plugin's reason, which load_image passes on as ImageDecodeError. The
    tracebacks would read as crashes in a service or build log for what is only a bad file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_QuietPluginFailures())

STRIP_PIXELS = 1 << 20  # pixels converted at a time when a conversion needs float temporaries

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
# What a DICOM file starts with; a data set saved without it can be read with it put in front.
DICOM_PREAMBLE = b"\x00" * 128 + b"DICM"
# What the image cache's entries were decoded by: bump it whenever decoding gives other pixels for
# the same file (a new rule, a fixed bug) or the cache keeps other things of a decode (3: the
# image's record), so caches made before are not read as current.
DECODER_REVISION = 3
# Bytes per pixel of each PIL mode as decoded ("1" is unpacked to a byte per pixel).
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3}
MODE_BYTES |= {"HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}
MODE_BYTES |= {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def looks_like_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open a file path or raw bytes as an 8-bit greyscale ('L') image, fully decoded.

    Raises ImageDecodeError for anything that cannot be decoded (ImageTooLargeError for images
    too large to decode), never another exception type for bad input. A DICOM image's header
    fields (convirt.imagerecord's naming table) are in its info["header"].
    """
    data = source if isinstance(source, bytes) else None
    path = None if data is not None else Path(source)
    head = data[:132] if data is not None else _read_head(path)
    is_dicom = looks_like_dicom(head) or (
        path is not None and path.suffix.lower() in DICOM_SUFFIXES
    )
    if is_dicom:
        return _load_dicom(io.BytesIO(data) if data is not None else path)
    check_file_codestream(data if data is not None else path)
    return _load_raster(io.BytesIO(data) if data is not None else path)


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError as err:
        raise ImageDecodeError(f"cannot read {path}: {err.strerror or err}") from err


def _load_raster(fp) -> Image.Image:
    try:
        with Image.open(fp) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageTooLargeError(
                    f"image is {img.width}x{img.height} pixels, above the {MAX_PIXELS:,} limit"
                )
            size = img.size
            _draft(img)
            check_size("image", img.width, img.height, MODE_BYTES.get(img.mode, 4))
            img.load()
            grey = _to_grey(img)
            grey.info["source_size"] = size  # width, height in the file, before any reduction
            return grey
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not a recognised image format (PNG, JPEG or DICOM)") from err
    except ImageDecodeError:
        raise
    except MemoryError:
        trim_heap()
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error...)
        trim_heap()  # what a failed decoder freed goes back to the system
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from err


def _draft(img: Image.Image) -> None:
    """Have libjpeg decode a huge JPEG at 1/2, 1/4 or 1/8 scale, keeping the shorter side at least
    DRAFT_MIN_SIDE; anything smaller (every image we train on) decodes exactly as before."""
    scale = draft_scale(img.width, img.height)
    if img.format != "JPEG" or scale == 1:
        return
    img.draft(img.mode, (img.width // scale, img.height // scale))


def _to_grey(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _array_to_grey(np.asarray(img))  # uint16: through a lookup table
    if img.mode in ("I", "F"):
        return _array_to_grey(np.asarray(img, dtype=np.float32))
    if img.mode in ("RGBA", "LA", "P", "PA"):
        return _composite_on_black(img)
    return img.convert("L")


def _composite_on_black(img: Image.Image) -> Image.Image:
    """Alpha-composite on opaque black, then to greyscale: in strips of rows, so the RGBA
    temporaries stay small (every step is per pixel, so the result is the same as in one go)."""
    grey = Image.new("L", img.size)
    rows = max(1, STRIP_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        strip = img.crop((0, top, img.width, min(img.height, top + rows))).convert("RGBA")
        background = Image.new("RGBA", strip.size, (0, 0, 0, 255))
        grey.paste(Image.alpha_composite(background, strip).convert("L"), (0, top))
    return grey


def _array_to_grey(
    pixels: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    invert: bool = False,
) -> Image.Image:
    """Min-max scale transform(pixels) (any numeric array; transform: per-value, e.g. DICOM
    LUTs) to 0..255 in float32, inverted if asked.

    8- and 16-bit integers go through a lookup table of every possible value, so no float copy
    of the image is ever made; anything else is converted in strips of rows. Both give exactly
    what converting the whole array at once to float32 would.
    """
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2:
        if not pixels.dtype.isnative:
            pixels = pixels.astype(pixels.dtype.newbyteorder("="))
        return _grey_by_table(pixels, transform, invert)
    if transform is not None:
        pixels = np.asarray(transform(pixels))
    flat = pixels.reshape(pixels.shape[0], -1) if pixels.ndim > 1 else pixels.reshape(1, -1)
    # float32 rounding is monotonic, so the extremes of the rounded values are the rounded
    # extremes: no float32 copy is needed to find them
    low = float(np.float32(np.nanmin(pixels)))
    high = float(np.float32(np.nanmax(pixels)))
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.empty(flat.shape, np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, flat.shape[1]))
    for top in range(0, flat.shape[0], rows):
        strip = flat[top : top + rows].astype(np.float32)
        out[top : top + rows] = np.rint((strip - low) * scale).clip(0, 255).astype(np.uint8)
    if invert:
        np.subtract(255, out, out=out)
    return Image.fromarray(out.reshape(pixels.shape), mode="L")


def _grey_by_table(
    pixels: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None, invert: bool
) -> Image.Image:
    unsigned = np.dtype(f"u{pixels.dtype.itemsize}")
    # domain[i]: the value whose bits, read unsigned, are i (so pixels.view(unsigned) indexes it)
    domain = np.arange(1 << (8 * pixels.dtype.itemsize), dtype=unsigned).view(pixels.dtype)
    codes = pixels.view(unsigned)
    present = np.zeros(domain.size, bool)
    rows = _strip_rows(codes)
    for top in range(0, codes.shape[0], rows):
        present |= np.bincount(codes[top : top + rows].ravel(), minlength=domain.size) > 0
    values = np.asarray(transform(domain) if transform is not None else domain)
    values = values.astype(np.float32)
    used = values[present]
    low, high = float(np.nanmin(used)), float(np.nanmax(used))
    scale = 255.0 / (high - low) if high > low else 0.0
    table = np.rint((values - low) * scale).clip(0, 255).astype(np.uint8)
    if invert:
        table = 255 - table
    out = np.empty(codes.shape, np.uint8)
    for top in range(0, codes.shape[0], rows):
        out[top : top + rows] = table[codes[top : top + rows]]
    return Image.fromarray(out, mode="L")


def _strip_rows(pixels: np.ndarray) -> int:
    width = math.prod(pixels.shape[1:]) if pixels.ndim > 1 else pixels.size
    return max(1, STRIP_PIXELS // max(1, width))


def _infer_transfer_syntax(ds) -> None:
    """A data set saved without file meta (no preamble, raw dump from some PACS exports) does not
    say how its pixels are encoded; uncompressed is the only possibility then, and the encoding
    the parser found tells which one."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def read_dicom(fp):
    """A DICOM file (a path or a binary file object) parsed by pydicom, its pixels not decoded
    yet; ImageDecodeError when it cannot be read (or would inflate past the budget)."""
    import pydicom

    try:
        if isinstance(fp, Path):
            with open(fp, "rb") as f:
                check_deflated(f)
        else:
            check_deflated(fp)
    except OSError as err:
        raise ImageDecodeError(f"unreadable DICOM file: {err}") from err
    try:
        return pydicom.dcmread(fp, force=True)
    except MemoryError:
        raise
    except Exception as err:  # pydicom raises many types for malformed files
        raise ImageDecodeError(f"unreadable DICOM file: {err}") from err


def _load_dicom(fp) -> Image.Image:
    ds = read_dicom(fp)
    try:
        image = _decode_dicom(ds)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as err:  # a bad header value, LUT or window: this file, not the caller
        raise ImageDecodeError(f"cannot decode DICOM pixel data: {err}") from err
    image.info["header"] = header_fields(ds)  # the data set is parsed once: its record's fields
    return image


def _header_int(ds, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    try:
        return int(default if value is None or value == "" else value)
    except (TypeError, ValueError) as err:
        raise ImageDecodeError(f"DICOM {keyword} is not a number: {value!r}") from err


def _decode_dicom(ds) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pixels, colour = dicom_frame(ds)
    if colour:
        return Image.fromarray(np.ascontiguousarray(pixels).astype(np.uint8)).convert("L")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    windowed = "WindowCenter" in ds or "VOILUTSequence" in ds

    def transform(values: np.ndarray) -> np.ndarray:
        values = apply_modality_lut(values, ds)
        return apply_voi_lut(values, ds) if windowed else values

    return _array_to_grey(pixels, transform, invert=photometric == "MONOCHROME1")


def dicom_frame(ds) -> tuple[np.ndarray, bool]:
    """(the stored values of the one frame we use, whether it is colour: rows x cols x 3), its
    size checked against the decode budget before decoding; ImageDecodeError otherwise."""
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM file has no pixel data (PixelData element missing)")
    _infer_transfer_syntax(ds)
    rows, cols = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
    samples = max(1, _header_int(ds, "SamplesPerPixel", 1))
    frames = _header_int(ds, "NumberOfFrames", 1)
    sample_bytes = max(1, math.ceil(_header_int(ds, "BitsAllocated", 8) / 8))
    if str(ds.file_meta.get("TransferSyntaxUID", "")) in JPEG2000_SYNTAXES:
        sample_bytes = max(sample_bytes, 4)
    check_size("DICOM frame", cols, rows, samples * sample_bytes)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or samples > 1
    # decode only the frame we use (multi-frame: colour the first, else the middle one)
    index = (0 if colour else frames // 2) if frames > 1 else 0
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        check_frame_codestream(ds, index, max(1, frames), rows, cols, samples)
    ds.pixel_array_options(index=index)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for truncated or undecodable data
        trim_heap()  # what a failed decoder freed goes back to the system
        raise ImageDecodeError(f"cannot decode DICOM pixel data: {err}") from err
    if colour or pixels.ndim == 4:
        return (pixels[0] if pixels.ndim == 4 else pixels), True
    if pixels.ndim == 3:  # several frames despite the index: take the middle one
        pixels = pixels[pixels.shape[0] // 2]
    return pixels, False


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` (bilinear): the first step of every view, and what the
    image cache stores."""
    w, h = image.size
    scale = size / min(w, h)
    if abs(scale - 1.0) < 1e-6:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
