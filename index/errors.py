"""Errors of the index package. Every message says what went wrong and what to do about it."""

from __future__ import annotations


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


def check_fingerprint(where: str, index_fingerprint: str, model_fingerprint: str | None) -> None:
    """Raise ModelMismatchError when a model fingerprint is given and differs from the index's."""
    if model_fingerprint is not None and model_fingerprint != index_fingerprint:
        raise ModelMismatchError(where, index_fingerprint, model_fingerprint)
