"""Errors of the index package. Every message says what went wrong and what to do about it."""

from __future__ import annotations

import re
from pathlib import Path


class IndexStoreError(RuntimeError):
    """An index root, version or operation cannot be used as asked."""


class NoIndexError(IndexStoreError):
    """The root holds no published version yet."""


class ModelMismatchError(IndexStoreError):
    """The index was built with another model bundle than the one offered."""

    def __init__(self, where: str, index_fingerprint: str, model_fingerprint: str):
        self.index_fingerprint = index_fingerprint
        self.model_fingerprint = model_fingerprint
        super().__init__(
            f"{where} was built with model fingerprint {index_fingerprint}, but the model "
            f"bundle has fingerprint {model_fingerprint}: use the bundle the index was built "
            "with, or rebuild the index with this model (`convirt index build --model BUNDLE ...`)"
        )


class IndexLockedError(IndexStoreError):
    """Another process is writing the same index root."""


class IndexSpecError(IndexStoreError):
    """An --index-type that FAISS cannot build for these vectors."""


class CorruptVersionError(IndexStoreError):
    """A published version whose files cannot be read or do not agree with each other."""

    def __init__(self, directory: Path, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            f"index version {directory.name} ({directory}) is damaged and was not opened: "
            + "; ".join(self.problems)
            + ". Point CURRENT back at the previous version or rebuild "
            "(`convirt index verify --root ROOT` lists every problem)"
        )


class FilterError(ValueError):
    """A filter or keyword the index cannot run: an unknown field, a value of the wrong shape, an
    empty range, a blank or overlong keyword. The client's mistake: the message says what is wrong
    and what is allowed. A ValueError, so callers that caught ValueError still catch it."""


class DiskFullError(IndexStoreError):
    """The disk holding the index root ran out of space while a new version was written."""


def check_fingerprint(where: str, index_fingerprint: str, model_fingerprint: str | None) -> None:
    """Raise ModelMismatchError when a model fingerprint is given and differs from the index's."""
    if model_fingerprint is not None and model_fingerprint != index_fingerprint:
        raise ModelMismatchError(where, index_fingerprint, model_fingerprint)


def reason(err: BaseException) -> str:
    """An error's message without FAISS's C++ location prefix ("Error in ... at FILE:LINE: ")."""
    text = str(err) or type(err).__name__
    match = re.match(r"^Error in .*? at \S+:\d+: (.*)$", text, re.DOTALL)
    return match.group(1).strip() if match else text
