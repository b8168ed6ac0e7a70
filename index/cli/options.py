"""Options several `convirt index` commands share, and the builder options they make.

--model, --device and --no-progress are declared once for every `convirt` command
(convirt.cli_options); the index commands default --device to cpu.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from convirt.cli_options import (
    add_device_option,
    add_model_option,
    add_no_progress_option,
    resolve_device,
)

from .. import faiss_index, layout
from ..errors import IndexStoreError
from ..sources.base import parse_shard
from ..write.build import Options
from ..write.embedding import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_BATCHES, DEFAULT_WORKERS

INDEX_TYPE_HELP = (
    f"FAISS structure: auto (exact below {faiss_index.AUTO_EXACT_MAX:,} vectors, HNSW above, "
    "compressed where --ram-budget is too small for them), flat (exact), hnsw, ivfpq, "
    "compressed (PQ codes in RAM, re-ranked exactly from float16 vectors on disk), or any "
    "faiss.index_factory string such as 'IVF256,Flat' (default: %(default)s)"
)
RAM_BUDGET_HELP = (
    "RAM the index may take, e.g. 64G or 500M: `auto` builds flat or HNSW where they fit, else "
    "compressed (index/faiss_index.py); kept in version.json for later writes "
    "(default: the current version's, else no limit)"
)
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """A size such as 64G, 500M or 1073741824 (bytes; K, M, G, T are powers of 1,024)."""
    number, unit = text.strip().upper().rstrip("B"), ""
    if number and number[-1] in UNITS:
        number, unit = number[:-1], number[-1]
    try:
        size = float(number) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64G, 500M)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"a RAM budget must be positive, not {text!r}")
    return int(size)


def add_ram_budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram-budget", type=parse_bytes, metavar="SIZE", help=RAM_BUDGET_HELP)


def subparser(commands, name: str, summary: str, details: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=f"{summary}.\n\n{details}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_root(p: argparse.ArgumentParser, flag: str, about: str) -> None:
    other = "--root" if flag == "--out" else "--out"
    p.add_argument(flag, other, dest="root", type=Path, required=True, metavar="ROOT", help=about)


def add_model(p: argparse.ArgumentParser) -> None:
    """--model BUNDLE: the bundle that embeds the images (required)."""
    add_model_option(
        p, help="model bundle directory written by `convirt train` (its bundle/ folder)"
    )


def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="images per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="processes decoding into the image cache, then threads preparing cached images "
        "ahead of the model (default: %(default)s)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        help="image cache folder (default: $CONVIRT_CACHE_DIR/images): images decoded for "
        "training, evaluation or an earlier build at the model's resize side are not decoded again",
    )
    p.add_argument(
        "--chunk-batches",
        type=int,
        default=DEFAULT_CHUNK_BATCHES,
        help="batches per commit to the staging area, the most a crash can lose "
        "(default: %(default)s)",
    )
    add_device_option(p, default="cpu")
    add_no_progress_option(p)
    add_keep(p)
    add_ram_budget(p)


def add_keep(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep",
        type=int,
        default=layout.KEEP_VERSIONS,
        help="published versions to keep, the current one included (default: %(default)s)",
    )


def parse_shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except IndexStoreError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def options(args: argparse.Namespace, index_type: str = "auto") -> Options:
    return Options(
        index_type=index_type,
        batch_size=args.batch_size,
        workers=args.workers,
        chunk_batches=args.chunk_batches,
        device=resolve_device(args.device),
        progress=not args.no_progress,
        keep=args.keep,
        cache_dir=args.cache,
        ram_budget=args.ram_budget,
    )
