"""`convirt pretrain-text`: its command line (the run itself: training/pretrain_text.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from pydantic import ValidationError

from convirt.cli_options import add_device_option, add_no_progress_option, command_parser
from convirt.paths import (
    DATA_ROOT_ENV,
    PAIRED_DATASETS,
    data_root,
    default_iu_reports,
    default_manifests,
)

from .pretrain_text import INFO_NAME, PretrainTextConfig, check_out_dir, pretrain_text
from .text_corpus import report_corpus

log = logging.getLogger(__name__)

DESCRIPTION = f"""\
Adapt the text encoder to medical report language before ConVIRT training.

Continues its masked-language-model pretraining on the sentences of the manifests'
train split (never dev text) and, by default, the iu-reports chest X-ray reports.
Writes OUT as a transformers folder (encoder weights without the MLM head,
tokenizer, {INFO_NAME}) for `convirt train --set model.text_encoder=OUT`.
5% of the sentences (at most --heldout) are held out: the JSON summary printed at
the end gives their MLM loss before and after."""


def parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "convirt pretrain-text",
        DESCRIPTION,
        epilog=(
            "example: convirt pretrain-text --out runs/minilm-med --minutes 4\n"
            f"Manifests default to {', '.join(PAIRED_DATASETS)} under ${DATA_ROOT_ENV} "
            f"(now {data_root()}). An OUT that already holds a finished pretraining is refused "
            "(reuse it as it is) unless --force replaces it."
        ),
    )
    defaults = PretrainTextConfig()
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--base",
        default="packaged",
        help="text encoder to start from: packaged (MiniLM), mpnet or a transformers folder "
        "(default: packaged)",
    )
    parser.add_argument(
        "--manifest", action="append", type=Path, dest="manifests",
        help="CSV or JSONL with text and split columns; repeat to combine (default: see below)",
    )  # fmt: skip
    parser.add_argument(
        "--no-iu-reports", action="store_true", help="leave out the iu-reports corpus"
    )
    parser.add_argument(
        "--minutes", type=float, default=defaults.minutes,
        help=f"time budget of the training loop (default: {defaults.minutes:g})",
    )  # fmt: skip
    parser.add_argument("--max-steps", type=int, help="also stop after this many steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size,
        help=f"sentences per step (default: {defaults.batch_size})",
    )  # fmt: skip
    parser.add_argument(
        "--lr", type=float, default=defaults.lr,
        help=f"peak learning rate (default: {defaults.lr:g})",
    )  # fmt: skip
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps,
        help="linear LR warm-up; then constant, or with --max-steps a linear decay to 0 "
        f"(default: {defaults.warmup_steps})",
    )  # fmt: skip
    parser.add_argument(
        "--max-tokens", type=int, default=defaults.max_tokens,
        help=f"tokens per sentence, longer ones are cut (default: {defaults.max_tokens})",
    )  # fmt: skip
    parser.add_argument(
        "--heldout", type=int, default=defaults.heldout,
        help=f"sentences kept out to score the MLM loss (at most 5%%; default: {defaults.heldout})",
    )  # fmt: skip
    add_device_option(parser)
    parser.add_argument(
        "--threads", type=int,
        help="torch CPU threads (default: torch's; 1 is faster when other jobs share the cores)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=defaults.seed,
        help="seeds head init, batch order, masks and the held-out slice (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier pretraining in --out"
    )
    add_no_progress_option(parser)
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        settings = PretrainTextConfig(
            minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size,
            lr=args.lr, warmup_steps=args.warmup_steps, max_tokens=args.max_tokens,
            heldout=args.heldout, iu_reports=not args.no_iu_reports, seed=args.seed,
        )  # fmt: skip
    except ValidationError as err:
        return _fail(_validation_message(err))
    if args.threads is not None:
        if args.threads < 1:
            return _fail("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        check_out_dir(args.out, args.force)
        corpus = _cli_corpus(args.manifests or default_manifests(), settings.iu_reports)
        result = pretrain_text(
            args.base, corpus, args.out, settings, progress=not args.no_progress,
            device=args.device, overwrite=args.force,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    summary = asdict(result) | {
        "out_dir": str(result.out_dir),
        "steps_per_second": round(result.steps / result.seconds, 2) if result.seconds else None,
        "use": f"--set model.text_encoder={result.out_dir}",
    }
    print(json.dumps(summary))
    return 0


def _cli_corpus(manifests: list[Path], iu_reports: bool) -> list[str]:
    missing = [m for m in manifests if not m.is_file()]
    if missing:
        raise FileNotFoundError(
            f"manifest not found: {missing[0]} (set {DATA_ROOT_ENV} or pass --manifest)"
        )
    iu_path = default_iu_reports() if iu_reports else None
    if iu_reports and iu_path is None:
        log.warning("iu-reports not found under %s: training on the manifests only", data_root())
    corpus = report_corpus(manifests, iu_reports=iu_path)
    if not corpus:
        raise ValueError(
            "the text corpus is empty: the manifests have no train rows with text "
            "(pass --manifest with a split column holding 'train')"
        )
    log.info("text corpus: %d sentences", len(corpus))
    return corpus


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def _fail(message: str) -> int:
    print(f"convirt pretrain-text: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
