"""FAISS index + SQLite metadata of an image archive, and the read API the service uses.

Write side (CLI `convirt index ...`, or `index.builder`): build, add, remove, reindex, merge; each
writes a new version under ROOT/versions/ and switches ROOT/CURRENT atomically.
Read side (`index.store`): open_current(root, expected_fingerprint) -> IndexStore.
Report sentences (`index.sentences`, written at publish) feed text ranking (`index.hybrid`) and
"what similar cases said" (`index.suggest`).
"""

import logging

# faiss logs its CPU-feature probing at INFO on import; `convirt` logs at INFO.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

from .errors import IndexStoreError, ModelMismatchError, NoIndexError  # noqa: E402
from .store import Hit, IndexStore, open_current, open_version  # noqa: E402

__all__ = [
    "Hit",
    "IndexStore",
    "IndexStoreError",
    "ModelMismatchError",
    "NoIndexError",
    "open_current",
    "open_version",
]
