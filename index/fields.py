"""One vocabulary for modality and one for body part, whatever an archive calls them.

Archives spell an exam every way: DICOM writes CR, DX or CT; MedPix "CT w/contrast (IV)" or
"MR - T2 weighted"; ROCO's captions give "MRI" or "ultrasound"; covid-cxr "X-ray". A filter
{"modality": "CT"} must find every CT, so every version stores one spelling, derived when the
version is published (index/write/rows.derive_fields, for every row of every write: build, add,
sync, remove, merge, reindex) from the fields below, the source's own text kept beside it:

    images.modality            MODALITIES (XR, CT, MR, US, NM, PT, XA, MG) or "other"; NULL when
                               no field names one
    meta modality_original     the text it was derived from
    meta body_part             BODY_PARTS or "other"; absent when nothing says
    meta body_part_original    the text it was derived from (a dataset's name where the
                               dataset says it: DATASET_BODY_PART)

The tables are plain on purpose: to teach it a new spelling, add a line. A value is looked up
whole (lower case, spaces squeezed), then by its first word, then by any word: "CT - GI & IV
Contrast" finds "ct", "MRA - MR Angiography/Venography" finds "mra". Anything no table knows is
"other" when nothing else the row holds is known, so no text is ever dropped from a filter: it
is still there under `modality_original`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

FIELDS_VERSION = 1  # stored in version.json as "fields"; raised whenever a table below changes

# -- modality ---------------------------------------------------------------------------------
MODALITIES = ("XR", "CT", "MR", "US", "NM", "PT", "XA", "MG")
OTHER = "other"
MODALITY_TERMS = {
    # projection radiography: DICOM CR (computed), DX (digital), RG, XR; "X-ray", "radiograph"
    "cr": "XR", "dx": "XR", "dr": "XR", "rg": "XR", "xr": "XR", "x-ray": "XR", "xray": "XR",
    "radiograph": "XR", "radiography": "XR", "plain film": "XR", "cxr": "XR",
    # computed tomography; CTA and virtual colonoscopy (CT colonography) are CTs
    "ct": "CT", "cta": "CT", "cat": "CT", "computed tomography": "CT",
    "virtual colonoscopy": "CT",
    # magnetic resonance; MRA (angiography) and MRS (spectroscopy) are MR exams
    "mr": "MR", "mri": "MR", "mra": "MR", "mrs": "MR", "mrv": "MR",
    "magnetic resonance": "MR",
    "us": "US", "ultrasound": "US", "sonography": "US", "echo": "US", "doppler": "US",
    "nm": "NM", "nuclear medicine": "NM", "scintigraphy": "NM", "spect": "NM",
    "pt": "PT", "pet": "PT", "pet-ct": "PT", "pet/ct": "PT",
    # catheter angiography (ROCO's "angiography" keyword); CTA and MRA are above
    "xa": "XA", "angiography": "XA", "angiogram": "XA", "dsa": "XA", "rf": "XA",
    "fluoroscopy": "XA",
    "mg": "MG", "mammography": "MG", "mammogram": "MG",
}  # fmt: skip
# Where a modality is read, first known value wins: DICOM's own tag, then a manifest's. MedPix
# gives a detailed `modality` ("Drawing" on 3 CT rows) and a coarse `type` (CT or MR) behind it.
MODALITY_SOURCES = ("Modality", "modality", "type", "modality_keyword")

# -- body part --------------------------------------------------------------------------------
BODY_PARTS = (
    "head", "neck", "chest", "breast", "abdomen", "pelvis", "spine", "musculoskeletal",
    "whole body",
)  # fmt: skip
BODY_PART_TERMS = {
    # DICOM BodyPartExamined (upper case in the header, compared in lower case)
    "head": "head", "brain": "head", "skull": "head", "orbit": "head", "iac": "head",
    "neck": "neck", "cspine": "spine", "tspine": "spine", "lspine": "spine", "spine": "spine",
    "chest": "chest", "thorax": "chest", "lung": "chest", "heart": "chest", "ribs": "chest",
    "breast": "breast", "abdomen": "abdomen", "liver": "abdomen", "kidney": "abdomen",
    "pelvis": "pelvis", "hip": "musculoskeletal", "abdomenpelvis": "abdomen",
    "extremity": "musculoskeletal", "knee": "musculoskeletal", "shoulder": "musculoskeletal",
    "hand": "musculoskeletal", "foot": "musculoskeletal", "ankle": "musculoskeletal",
    "wrist": "musculoskeletal", "elbow": "musculoskeletal", "leg": "musculoskeletal",
    "arm": "musculoskeletal", "wholebody": "whole body", "whole body": "whole body",
    # MedPix `location` (finer) and `location_category`; values that name no region
    # ("Generalized", "Vascular", "Pathology", ...) fall through to the category
    "brain and neuro": "head", "head and neck": "head", "eye and orbit": "head",
    "ophthalmology": "head", "dental, oral, or tooth": "head",
    "chest, pulmonary": "chest", "cardiovascular": "chest", "breast and mammography": "breast",
    "gastrointestinal": "abdomen", "genitourinary": "pelvis", "musculoskeletal": "musculoskeletal",
    "spine and muscles": "musculoskeletal",
    # MedPix groups kidneys with bladder, prostate and uterus; its cases are mostly pelvic organs
    "reproductive and urinary system": "pelvis",
}  # fmt: skip
BODY_PART_SOURCES = ("body_part", "BodyPartExamined", "location", "location_category")
# Datasets of one region whose rows name none: both COVID collections are chest imaging (chest
# radiographs and chest CT slices), so their body part is chest. Found by the row's `dataset`
# field (the demo archive's) or the name of the folder its manifest is in; body_part_original
# is then that name.
DATASET_BODY_PART = {"covid-cxr": "chest", "covid-ct": "chest"}


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def known_term(text: Any, terms: Mapping[str, str]) -> str | None:
    """The vocabulary word for one value, or None when no table line covers it: the whole
    value, then its first word, then any of its words (in order)."""
    if text is None:
        return None
    plain = _plain(str(text))
    if not plain:
        return None
    if plain in terms:
        return terms[plain]
    words = re.findall(r"[a-z0-9]+(?:[-/][a-z0-9]+)*", plain)
    for word in words:
        if word in terms:
            return terms[word]
    return None


def normalise_modality(text: Any) -> str | None:
    """One value's modality: a MODALITIES code, "other" for text no table knows, None if empty."""
    if text is None or not str(text).strip():
        return None
    return known_term(text, MODALITY_TERMS) or OTHER


def normalise_body_part(text: Any) -> str | None:
    """One value's body part: a BODY_PARTS word, "other" for unknown text, None if empty."""
    if text is None or not str(text).strip():
        return None
    return known_term(text, BODY_PART_TERMS) or OTHER


def dataset_of(meta: Mapping[str, Any], source: str | None = None) -> str | None:
    """The dataset a row comes from: its `dataset` field, else its manifest's folder name."""
    named = str(meta.get("dataset") or "").strip()
    if named:
        return named
    if source and source.lower().endswith(".csv"):
        return PurePath(source).parent.name or None
    return None


def _derive(
    values: list[Any], terms: Mapping[str, str], fallback: tuple[str, str] | None = None
) -> tuple[str | None, str | None]:
    """(normalised, original) from the values a row holds, most trusted first; `fallback`
    (normalised, original) where none is known."""
    texts = [str(v).strip() for v in values if v is not None and str(v).strip()]
    original = texts[0] if texts else None
    for text in texts:
        found = known_term(text, terms)
        if found:
            return found, original
    if fallback:
        return fallback[0], original or fallback[1]
    return (OTHER if texts else None), original


def derived_fields(meta: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """What one row's normalised fields are: {"modality", "modality_original", "body_part",
    "body_part_original"}, each None where nothing says. A row already derived gives the same
    answer again: `body_part`, the one field that is both read and written, is read from
    `body_part_original` once that exists."""
    modality, modality_original = _derive(
        [meta.get(name) for name in MODALITY_SOURCES], MODALITY_TERMS
    )
    own = meta.get("body_part_original") if "body_part_original" in meta else meta.get("body_part")
    parts = [own, *(meta.get(name) for name in BODY_PART_SOURCES[1:])]
    dataset = dataset_of(meta, source) or ""
    by_dataset = (DATASET_BODY_PART[dataset], dataset) if dataset in DATASET_BODY_PART else None
    body_part, body_part_original = _derive(parts, BODY_PART_TERMS, by_dataset)
    return {
        "modality": modality,
        "modality_original": modality_original,
        "body_part": body_part,
        "body_part_original": body_part_original,
    }


def with_derived(meta: Mapping[str, Any], source: str | None = None) -> tuple[str | None, dict]:
    """(the modality column, the metadata) of a row once its fields are normalised: the
    metadata gains modality_original, body_part and body_part_original where they have a value
    (and loses stale ones where they no longer do)."""
    found = derived_fields(meta, source)
    stale = {"modality_original", "body_part_original"}
    if found["body_part"] is None:
        stale.add("body_part")
    out = {k: v for k, v in meta.items() if k not in stale}
    for key in ("modality_original", "body_part", "body_part_original"):
        if found[key] is not None:
            out[key] = found[key]
    return found["modality"], out


def outdated_note(info: Mapping[str, Any], root: Any) -> str | None:
    """What the service logs when it serves a version whose fields are not this vocabulary's
    (built before it, or before a table changed); None when they are."""
    if info.get("fields") == FIELDS_VERSION:
        return None
    return (
        f"index version {info.get('version')} was written before the modality and body part "
        "vocabulary (index/fields.py): filters and facets see the archive's own spellings; "
        f"`convirt index reindex --root {root}` derives them without re-embedding"
    )


# How a card names a modality in its exam line ("CT · Chest"); "other" shows the archive's own text.
MODALITY_NAMES = {
    "XR": "X-ray", "CT": "CT", "MR": "MR", "US": "Ultrasound", "NM": "Nuclear medicine",
    "PT": "PET", "XA": "Angiography", "MG": "Mammography",
}  # fmt: skip
