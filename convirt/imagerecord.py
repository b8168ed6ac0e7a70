"""The record of one image: what the one read and the one decode of its file learnt about it.

An image is hashed once and decoded once (convirt.cachebuild); that decode fills its record: the
file's size, the image's size as decoded, its DICOM header fields and its thumbnail. The record is
kept in the image cache beside the pixels, so a later build that finds the pixels finds the record
too; the index's embedding job adds the vectors and stages it, and its metadata row is written
from it (index.write: embedding -> staging -> rows), the same object all the way.

DICOM header fields have one spelling, the DICOM keyword, whatever the image came from (a folder,
a manifest, a PACS): HEADER_FIELDS is the naming table. FORMER_NAMES are the spellings that index
versions built before it stored for folder DICOMs; `convirt index reindex` renames them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# The naming table: the DICOM header fields an image's metadata holds, by their DICOM keyword.
HEADER_FIELDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PatientID",
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "StudyDate",
    "AccessionNumber",
)
# What folder builds stored before the naming table (former name -> its field).
FORMER_NAMES = {
    "modality": "Modality",
    "view": "ViewPosition",
    "body_part": "BodyPartExamined",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "patient_id": "PatientID",
}
THUMBNAIL_SIZE = 128  # longest side, pixels
THUMBNAIL_QUALITY = 85


def header_fields(dataset: Any) -> dict[str, str]:
    """The naming table's fields a DICOM data set (pydicom) holds, as text; empty ones left out."""
    fields = {}
    for keyword in HEADER_FIELDS:
        try:
            value = dataset.get(keyword)
        except Exception:  # a malformed element costs that field, never the image
            continue
        if value not in (None, ""):
            fields[keyword] = str(value)
    return fields


def renamed_former(meta: dict[str, Any]) -> dict[str, Any]:
    """A DICOM image's metadata with FORMER_NAMES under their field's name (where both are there,
    the field's own value is kept): what `convirt index reindex` makes of an older version's row."""
    out = {k: v for k, v in meta.items() if k not in FORMER_NAMES}
    for former, keyword in FORMER_NAMES.items():
        if former in meta:
            out.setdefault(keyword, meta[former])
    return out


def shrink_to_thumbnail(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG of the decoded image, its longest side at most `size`. Shrinks `image` in place (no
    copy of a full-size decode is made): the caller is done with it."""
    image.thumbnail((size, size), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


@dataclass
class ImageRecord:
    """One image's content: filled by its decode, given its vectors by the embedding job, staged,
    then written as its metadata row."""

    sha256: str
    size_bytes: int  # of the file
    width: int  # as decoded, before any shrinking
    height: int
    header: dict[str, str]  # DICOM header fields (HEADER_FIELDS); {} for other formats
    thumbnail: bytes  # JPEG, from the same decode
    encoder: np.ndarray | None = None  # h/|h|, float32, once embedded
    joint: np.ndarray | None = None  # v/|v|, float32, once embedded
