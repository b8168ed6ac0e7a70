"""A manifest (CSV or JSONL) as a source: image paths with metadata and report text per row."""

from __future__ import annotations

from pathlib import Path

from convirt.manifest import ManifestError, read_manifest_items

from .base import Source, SourceError


def read_manifest(
    manifest: str | Path, image_column: str = "image", text_column: str = "text"
) -> Source:
    """Rows of a CSV or JSONL manifest; image paths are relative to the manifest's directory."""
    manifest = Path(manifest).absolute()
    try:
        items, skipped = read_manifest_items(
            manifest, image_column=image_column, text_column=text_column
        )
    except ManifestError as err:
        raise SourceError(str(err)) from err
    items.sort(key=lambda item: item.relpath)  # stable: repeated rows keep manifest order
    return Source("manifest", manifest, items, skipped)
