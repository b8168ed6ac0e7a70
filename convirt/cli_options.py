"""What several `convirt` commands share, declared once: --device, --model, --no-progress, and
the parser of a command whose help keeps its own line breaks.

Each command keeps its own default (training follows its config, evaluation and indexing run on
the CPU unless told otherwise, `convirt serve` its CONVIRT_* settings); the flag's name, type and
meaning are the same everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEVICES = "auto, cpu, cuda or cuda:N"


def command_parser(
    prog: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A command's parser whose description and epilog are printed as written (line breaks kept)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_device_option(
    parser: argparse.ArgumentParser, default: str | None = "auto", help: str | None = None
) -> None:
    """--device: the torch device; auto is cuda when there is one. None: the command's config
    (or settings) decides; `help` then says what that is."""
    shown = "the config's" if default is None else default
    parser.add_argument("--device", default=default, help=help or f"{DEVICES} (default: {shown})")


def add_model_option(
    parser: argparse.ArgumentParser, *, required: bool = True, help: str = "model bundle folder"
) -> None:
    """--model BUNDLE: a model bundle folder (RUN/bundle)."""
    parser.add_argument("--model", type=Path, required=required, metavar="BUNDLE", help=help)


def add_no_progress_option(parser: argparse.ArgumentParser) -> None:
    """--no-progress: no progress bars (logs and scripts)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_device(name: str) -> str:
    """A --device value as torch names it: auto becomes cuda when there is one, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
