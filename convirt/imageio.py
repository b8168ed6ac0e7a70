"""Decode PNG, JPEG and DICOM into 8-bit greyscale PIL images, with clear errors for bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs: ~100 megapixels is far above any radiograph we expect.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageDecodeError(ValueError):
    """The input is not an image we can decode; the message says why."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than MAX_PIXELS (a likely decompression bomb)."""


def looks_like_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open a file path or raw bytes as an 8-bit greyscale ('L') image, fully decoded."""
    data = source if isinstance(source, bytes) else None
    path = None if data is not None else Path(source)
    head = data[:132] if data is not None else _read_head(path)
    is_dicom = looks_like_dicom(head) or (
        path is not None and path.suffix.lower() in DICOM_SUFFIXES
    )
    if is_dicom:
        return _load_dicom(io.BytesIO(data) if data is not None else path)
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
            img.load()
            return _to_grey(img)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not a recognised image format (PNG, JPEG or DICOM)") from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageDecodeError):
            raise
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from err


def _to_grey(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_grey(np.asarray(img, dtype=np.float32))
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L")


def _array_to_grey(pixels: np.ndarray) -> Image.Image:
    """Min-max scale any numeric array to 0..255."""
    pixels = pixels.astype(np.float32)
    low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(np.rint((pixels - low) * scale).clip(0, 255).astype(np.uint8), mode="L")


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


def _load_dicom(fp) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(fp, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as err:
        raise ImageDecodeError(f"unreadable DICOM file: {err}") from err
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM file has no pixel data (PixelData element missing)")
    _infer_transfer_syntax(ds)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise ImageTooLargeError(f"DICOM is {cols}x{rows} pixels, above the {MAX_PIXELS:,} limit")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for truncated or undecodable data
        raise ImageDecodeError(f"cannot decode DICOM pixel data: {err}") from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or pixels.ndim == 4:
        frame = pixels[0] if pixels.ndim == 4 else pixels
        return Image.fromarray(np.ascontiguousarray(frame).astype(np.uint8)).convert("L")
    if pixels.ndim == 3:  # multi-frame: take the middle frame
        pixels = pixels[pixels.shape[0] // 2]
    pixels = apply_modality_lut(pixels, ds)
    pixels = apply_voi_lut(pixels, ds) if "WindowCenter" in ds or "VOILUTSequence" in ds else pixels
    grey = _array_to_grey(np.asarray(pixels))
    if photometric == "MONOCHROME1":  # high values are dark: invert to the usual display
        grey = Image.fromarray(255 - np.asarray(grey), mode="L")
    return grey


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` (bilinear): the first step of every view, and what the
    image cache stores."""
    w, h = image.size
    scale = size / min(w, h)
    if abs(scale - 1.0) < 1e-6:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
