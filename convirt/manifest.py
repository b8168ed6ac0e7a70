"""Reading manifests: CSV or JSONL files with one row per image (path, report, metadata).

One reader for training, evaluation and indexing. Rows stream: a manifest of a few hundred
thousand rows is never held as a list of dicts by a caller that does not want one.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path


class ManifestError(ValueError):
    """A manifest cannot be used; the message names the file and what to change."""


@dataclass
class ManifestItem:
    """One image a manifest (or a folder scan) names: where it is, how the source names it, its
    report and its other columns."""

    path: Path  # absolute and normalised; symlinks are not followed (a link keeps its own name)
    relpath: str  # as the source names it, '/'-separated
    text: str = ""
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Skip:
    """Something that was not used, and why: a row naming no file, an unreadable image, ..."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


FILE_NOT_FOUND = "file not found (named by the manifest)"
EMPTY_TEXT = "empty text"


def iter_manifest_rows(path: str | Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV or JSONL manifest as dicts of strings (missing values become ''), streamed."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield _json_row(path, number, line)
        return
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            yield {k: v or "" for k, v in row.items() if k is not None}


def read_manifest_rows(path: str | Path) -> list[dict[str, str]]:
    """Every row at once: for small manifests (scripts, tests)."""
    return list(iter_manifest_rows(path))


def _json_row(path: Path, number: int, line: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{number}: not valid JSON: {err}") from err
    if not isinstance(row, dict):
        raise ManifestError(f"{path}:{number}: expected a JSON object per line")
    return {k: "" if v is None else str(v) for k, v in row.items()}


def iter_manifest(
    manifest: str | Path,
    split: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    split_column: str = "split",
    require_text: bool = False,
) -> Iterator[ManifestItem | Skip]:
    """The rows of one split (all rows when split is None) as items, in manifest order.

    Rows naming no existing file, and with `require_text` rows without a report, come out as
    Skips in their place. Image paths are relative to the manifest's folder (or absolute).
    Metadata keeps every non-empty column except the image and text ones.
    """
    manifest = Path(manifest).absolute()
    rows = iter_manifest_rows(manifest)
    first = next(rows, None)
    if first is None:
        raise ManifestError(f"{manifest} has no rows")
    needed = (image_column, text_column) if require_text else (image_column,)
    for column in needed:
        if column not in first:
            raise ManifestError(
                f"{manifest} has no column {column!r}; its columns are: {', '.join(first)} "
                "(choose with --image-column / --text-column)"
            )
    if split is not None and split_column not in first:
        raise ManifestError(f"{manifest} has no {split_column!r} column to select split {split!r}")
    for row in chain([first], rows):
        if split is None or row.get(split_column) == split:
            yield _item(manifest, row, image_column, text_column, require_text)


def _item(
    manifest: Path, row: dict[str, str], image_column: str, text_column: str, require_text: bool
) -> ManifestItem | Skip:
    relpath = Path(row.get(image_column, "")).as_posix()
    path = Path(os.path.normpath(manifest.parent / relpath))
    text = (row.get(text_column) or "").strip()
    if not row.get(image_column) or not path.is_file():
        return Skip(str(path), FILE_NOT_FOUND)
    if require_text and not text:
        return Skip(str(path), EMPTY_TEXT)
    meta = {k: v for k, v in row.items() if v and k not in (image_column, text_column)}
    return ManifestItem(path, relpath, text, meta)


def read_manifest_items(
    manifest: str | Path, split: str | None = None, **columns
) -> tuple[list[ManifestItem], list[Skip]]:
    """iter_manifest collected: the items and the skips, for callers that want lists (training,
    evaluation; the index's read_manifest turns them into a Source)."""
    items: list[ManifestItem] = []
    skips: list[Skip] = []
    for entry in iter_manifest(manifest, split, **columns):
        (skips if isinstance(entry, Skip) else items).append(entry)
    return items, skips
