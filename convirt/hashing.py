"""The SHA-256 of a file, read in blocks: one function for every file the project checks.

Manifests (a run's identity), the int8 query encoder (int8.json records it), the packaged MPNet
parts, the image cache's content keys and an index version's data files are all named by it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes, streamed (a manifest of 300k rows is ~80 MB). Raises
    OSError when the file cannot be read."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
