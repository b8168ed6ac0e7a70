"""A folder tree of images as a source: known suffixes at any depth, and suffix-less DICOM files.

Items come out sorted by their path relative to the folder, which fixes the processing order (and
so which copy of a duplicated image is kept) whatever the file system lists first."""

from __future__ import annotations

import os
from pathlib import Path

from convirt.imageio import IMAGE_SUFFIXES, looks_like_dicom
from convirt.manifest import ManifestItem

from .base import Source, SourceError


def scan_folder(folder: str | Path) -> Source:
    """Every image under `folder` at any depth: known suffixes, and suffix-less DICOM files."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise SourceError(f"--images {folder}: not a directory")
    items = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            path = Path(directory) / name
            if not name.startswith(".") and _is_candidate(path):
                items.append(ManifestItem(path, path.relative_to(folder).as_posix()))
    items.sort(key=lambda item: item.relpath)
    return Source("images", folder, items)


def single_file(path: str | Path) -> Source:
    path = Path(path).absolute()
    return Source("images", path.parent, [ManifestItem(path, path.name)])


def _is_candidate(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix:
        return False
    try:
        with open(path, "rb") as f:
            return looks_like_dicom(f.read(132))
    except OSError:
        return False
