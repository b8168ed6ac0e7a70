"""What an uploaded file is, told by its first bytes (the client's Content-Type is only a hint)."""

from __future__ import annotations

from pathlib import PurePath

from convirt.imageio import DICOM_PREAMBLE, looks_like_dicom

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
