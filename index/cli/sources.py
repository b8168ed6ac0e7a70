"""--images, --manifest or --dicomweb: the source `convirt index build` and `add` read."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..sources.base import Source
from ..sources.folder import scan_folder, single_file
from ..sources.manifest import read_manifest
from . import dicomweb


def add_source(p: argparse.ArgumentParser, allow_file: bool = False) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--images",
        type=Path,
        metavar="DIR" + ("|FILE" if allow_file else ""),
        help="folder scanned at any depth for PNG, JPEG and DICOM files"
        + (" (or one image file)" if allow_file else ""),
    )
    group.add_argument(
        "--manifest",
        type=Path,
        metavar="M",
        help="CSV or JSONL: an image column (path relative to the manifest), an "
        "optional report text column, other columns kept as metadata",
    )
    group.add_argument(
        "--dicomweb",
        metavar="URL",
        help="a PACS's DICOMweb base URL (e.g. http://pacs:8042/dicom-web): instances found by "
        "QIDO-RS, fetched by WADO-RS",
    )
    p.add_argument("--image-column", default="image", help="manifest image column (default: image)")
    p.add_argument("--text-column", default="text", help="manifest report column (default: text)")
    dicomweb.add_dicomweb_options(p)


def load_source(args: argparse.Namespace, known_root: Path | None = None) -> Source:
    """The source the arguments name. known_root (add): the root whose current version a remote
    source's instances are compared with (those it holds are not fetched again)."""
    if args.dicomweb is not None:
        return dicomweb.load_source(args, known_root)
    dicomweb.refuse_flags(args)
    if args.manifest is not None:
        return read_manifest(args.manifest, args.image_column, args.text_column)
    if args.images.is_file():
        return single_file(args.images)
    return scan_folder(args.images)
