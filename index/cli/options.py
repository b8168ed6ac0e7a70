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
    f"FAISS structure: auto (exact below {faiss_index.AUTO_EXACT_MAX:,} vectors, HNSW above), "
    "flat (exact), hnsw, ivfpq, or any faiss.index_factory string such as 'IVF256,Flat' "
    "(default: %(default)s)"
)


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
    )
