"""An image's values for a viewer with window/level: not the 8-bit greyscale the model reads
(convirt.imageio load_image), but 16-bit samples that keep what the file holds.

A DICOM image keeps its values after the modality transform (CT: Hounsfield units, via Rescale
Slope/Intercept or a Modality LUT) and its own window (Window Center/Width, the first one where
several are given), so a viewer opens it as the modality meant it to be read. Other images (PNG,
JPEG...) are decoded by load_image, so they are 8-bit grey (a colour image is made grey, as the
model sees it) and their window is their full range. Decoding is bounded as load_image's is
(convirt.decode_budget: the same header and codestream checks).

The samples are uint16; what they stand for is value = intercept + slope * sample: integer
values that fit are sent as they are (slope 1), others shifted (intercept) or scaled to the
16-bit range. MONOCHROME1 (white is low) is inverted so that high samples are bright everywhere:
its slope is negative. Images whose longest side is above MAX_SIDE are area-downsampled. `unit`
names what the values are where the file says (Hounsfield units for CT), for the viewer's label.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .imageio import DICOM_SUFFIXES, dicom_frame, load_image, looks_like_dicom, read_dicom

MAX_SIDE = 2048
SAMPLE_MAX = 65535


@dataclass(frozen=True)
class ViewPixels:
    samples: bytes  # uint16, little-endian, row-major height x width
    width: int
    height: int
    original_width: int
    original_height: int
    window_center: float  # in sample units
    window_width: float
    value_min: int  # the smallest and largest sample
    value_max: int
    slope: float  # value = intercept + slope * sample
    intercept: float
    colour: bool  # the file was colour, made grey
    unit: str = ""  # of the values: "HU" for CT (or a Rescale Type of HU), else "" (none known)


@dataclass(frozen=True)
class Values:
    """An image's values (float32, full size, before any downsampling) and what they hold."""

    array: np.ndarray
    integer: bool  # every value is an integer (so slope 1 keeps them exactly)
    window: tuple[float, float] | None  # the file's own (center, width), in value units
    inverted: bool  # MONOCHROME1
    colour: bool
    unit: str = ""  # ViewPixels.unit


def view_pixels(source: str | Path | bytes, max_side: int = MAX_SIDE) -> ViewPixels:
    """The samples of an image (a path or its bytes) for a viewer (module docstring). Raises
    convirt.imageio.ImageDecodeError (ImageTooLargeError) as load_image does."""
    data = source if isinstance(source, bytes) else None
    path = None if data is not None else Path(source)
    if data is not None:
        dicom = looks_like_dicom(data[:132])
    else:
        with open(path, "rb") as f:
            dicom = looks_like_dicom(f.read(132)) or path.suffix.lower() in DICOM_SUFFIXES
    if dicom:
        values = dicom_values(io.BytesIO(data) if data is not None else path)
        original = values.array.shape[1], values.array.shape[0]
    else:
        image = load_image(data if data is not None else path)
        original = image.info.get("source_size", image.size)
        values = Values(np.asarray(image, np.float32), True, None, False, False)
    return to_samples(values, original, max_side)


def dicom_values(fp) -> Values:
    """A DICOM frame's values after its modality transform, with its own window."""
    from pydicom.pixels import apply_modality_lut

    ds = read_dicom(fp)
    frame, colour = dicom_frame(ds)
    if colour:
        grey = Image.fromarray(np.ascontiguousarray(frame).astype(np.uint8)).convert("L")
        return Values(np.asarray(grey, np.float32), True, None, False, True)
    integer = frame.dtype.kind in "iu"
    if "ModalityLUTSequence" in ds:
        array = np.asarray(apply_modality_lut(frame, ds), np.float32)
    else:
        slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
        array = frame.astype(np.float32)
        if (slope, intercept) != (1.0, 0.0):
            array *= np.float32(slope)
            array += np.float32(intercept)
        integer = integer and slope.is_integer() and intercept.is_integer()
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    inverted = photometric == "MONOCHROME1"
    return Values(array, integer, _window(ds), inverted, False, _unit(ds))


def to_samples(values: Values, original: tuple[int, int], max_side: int) -> ViewPixels:
    array = values.array
    height, width = array.shape
    scale = max_side / max(width, height)
    integer = values.integer
    if scale < 1:  # area-downsampled: each sample the mean of the values it covers
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        array = np.asarray(Image.fromarray(array, mode="F").resize(size, Image.BOX))
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if integer and high - low <= SAMPLE_MAX:
        step = 1.0
        fits = low >= 0 and high <= SAMPLE_MAX and not values.inverted
        base = 0.0 if fits else low
    else:
        step = (high - low) / SAMPLE_MAX or 1.0
        base = low
    slope, intercept = (-step, high) if values.inverted else (step, base)
    samples = np.rint((array - np.float32(intercept)) / np.float32(slope))
    samples = samples.clip(0, SAMPLE_MAX).astype("<u2")
    smallest, largest = (int(samples.min()), int(samples.max())) if samples.size else (0, 0)
    if values.window is not None:
        center = (values.window[0] - intercept) / slope
        window = abs(values.window[1] / slope)
    else:
        center, window = (smallest + largest) / 2, max(1, largest - smallest)
    return ViewPixels(
        samples.tobytes(),
        samples.shape[1],
        samples.shape[0],
        int(original[0]),
        int(original[1]),
        round(center, 4),
        round(window, 4),
        smallest,
        largest,
        slope,
        intercept,
        values.colour,
        values.unit,
    )


def _number(ds, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    try:
        return float(default if value in (None, "") else value)
    except (TypeError, ValueError):
        return default


def _unit(ds) -> str:
    """The values' unit: HU where they are Hounsfield units (a Rescale Type saying so, or a CT
    without a Rescale Type: its rescale gives HU by definition), "" where it is not known."""
    rescale_type = str(ds.get("RescaleType", "") or "").strip().upper()
    if rescale_type:
        return "HU" if rescale_type == "HU" else ""
    return "HU" if str(ds.get("Modality", "")).strip().upper() == "CT" else ""


def _window(ds) -> tuple[float, float] | None:
    """The first Window Center/Width of the data set, when it has a usable one."""
    try:
        center, width = float(_first(ds.get("WindowCenter"))), float(_first(ds.get("WindowWidth")))
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width > 0 and np.isfinite([center, width]).all() else None


def _first(value):
    """The first of a multi-valued element (pydicom MultiValue), or the value itself."""
    from pydicom.multival import MultiValue

    return value[0] if isinstance(value, MultiValue | list | tuple) else value
