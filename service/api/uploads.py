"""What an uploaded file is, told by its first bytes (the client's Content-Type is only a hint), and
the region box of a query parsed from its text field (service/model/region.py: the Box itself)."""

from __future__ import annotations

from pathlib import PurePath

from convirt.imageio import DICOM_PREAMBLE, looks_like_dicom
from service.model.region import Box

from .errors import ApiError

SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"BM": "bmp",
}
DICOM_CONTENT_TYPES = {"application/dicom", "application/dicom+octet-stream"}


def sniff(data: bytes, filename: str | None, content_type: str | None) -> str | None:
    """'png', 'jpeg', 'tiff', 'bmp', 'dicom', 'dicom-raw' (no preamble), or None."""
    if looks_like_dicom(data[:132]):
        return "dicom"
    for signature, kind in SIGNATURES.items():
        if data.startswith(signature):
            return kind
    declared_dicom = (content_type or "").split(";")[0].strip().lower() in DICOM_CONTENT_TYPES
    if declared_dicom or PurePath(filename or "").suffix.lower() in (".dcm", ".dicom"):
        return "dicom-raw"
    return None


def image_bytes(data: bytes, filename: str | None, content_type: str | None) -> bytes:
    """The upload, ready for convirt.imageio.load_image; 415 when it is not an image at all."""
    if not data:
        raise ApiError(422, "empty_upload", "the uploaded file is empty")
    kind = sniff(data, filename, content_type)
    if kind is None:
        raise ApiError(
            415,
            "not_an_image",
            "the upload is not an image: send a PNG, JPEG or DICOM file",
            {"content_type": content_type, "filename": filename},
        )
    if kind == "dicom-raw":  # a DICOM data set without the file preamble: give it one
        return DICOM_PREAMBLE + data
    return data


def parse_box(text: str | None) -> Box | None:
    """The `box` form or query field, "left,top,right,bottom" as fractions of the image size."""
    if text is None or not text.strip():
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(0 <= v <= 1 for v in values):
        raise ApiError(
            422,
            "invalid_box",
            'box is "left,top,right,bottom", four fractions of the image size from 0 to 1, '
            'e.g. "0.25,0.3,0.75,0.8"',
        )
    left, top, right, bottom = values
    if right <= left or bottom <= top:
        raise ApiError(422, "invalid_box", "box: right must exceed left and bottom exceed top")
    return Box(left, top, right, bottom)
