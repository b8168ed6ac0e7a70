"""Reading manifests: CSV or JSONL files with one row per image (path, report, metadata)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class ManifestError(ValueError):
    """A manifest cannot be used; the message names the file and what to change."""


def read_manifest_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV or JSONL manifest as dicts of strings (missing values become '')."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path}:{number}: not valid JSON: {err}") from err
                rows.append({k: "" if v is None else str(v) for k, v in row.items()})
        return rows
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [{k: v or "" for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
