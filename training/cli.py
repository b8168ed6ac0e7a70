"""Command lines of `convirt train` and `convirt eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from convirt.cli_options import (
    add_device_option,
    add_model_option,
    add_no_progress_option,
    command_parser,
)
from convirt.imagecache import CacheError
from convirt.paths import DATA_ROOT_ENV, PAIRED_DATASETS, data_root, default_manifests

from .config import ConfigError, available_configs, load_config, parse_assignments

TRAIN_DESCRIPTION = """\
Train ConVIRT on (image, report) pairs: one random sentence of each report against a random view \
of its image. Writes OUT/checkpoint.pt every epoch, OUT/metrics.csv and OUT/steps.csv, and the \
best epoch (by select_by: lowest validation loss, or best mean text-to-image recall@10 over the \
dev splits) as the bundle OUT/bundle. Run under torchrun for several GPUs."""


def train_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "convirt train",
        TRAIN_DESCRIPTION,
        epilog=(
            "example: convirt train --config cpu --out runs/cpu\n"
            f"Manifests default to {', '.join(PAIRED_DATASETS)} under ${DATA_ROOT_ENV} "
            f"(now {data_root()})."
        ),
    )
    parser.add_argument(
        "--config", default="cpu",
        help=f"named config ({', '.join(available_configs())}) or a YAML path (default: cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--manifest", action="append", type=Path, dest="manifests",
        help="CSV or JSONL with image (path relative to the manifest) and text columns, and a "
        "split column; repeat to combine datasets",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int, help="crop size in pixels")
    parser.add_argument("--lr", type=float, help="learning rate")
    add_device_option(parser, default=None)
    parser.add_argument("--num-workers", type=int, help="data loader worker processes")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--cache", type=Path,
        help="image cache folder (default: $CONVIRT_CACHE_DIR/images); filled when images are "
        "missing from it",
    )  # fmt: skip
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--sentence-filter", choices=["none", "imaging"],
        help="sample from every sentence (paper) or only those describing the image",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any other config field, e.g. --set model.text_frozen_layers=3 (YAML value)",
    )  # fmt: skip
    add_no_progress_option(parser)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "model.image_size": args.image_size,
        "lr": args.lr,
        "device": args.device,
        "num_workers": args.num_workers,
        "threads": args.threads,
        "cache_dir": str(args.cache) if args.cache else None,
        "seed": args.seed,
        "sentence_filter": args.sentence_filter,
    } | parse_assignments(args.set)


def train_main(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    from .train import train

    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as err:
        print(f"convirt train: {err}", file=sys.stderr)
        return 2
    manifests = args.manifests or default_manifests()
    missing = [m for m in manifests if not m.is_file()]
    if missing:
        print(
            f"convirt train: manifest not found: {missing[0]} "
            f"(set {DATA_ROOT_ENV} or pass --manifest)",
            file=sys.stderr,
        )
        return 2
    try:
        result = train(
            config, manifests, args.out, resume=args.resume, progress=not args.no_progress
        )
    except (FileExistsError, ValueError, CacheError) as err:
        print(f"convirt train: {err}", file=sys.stderr)
        return 2
    state = result.state
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports
    print(
        json.dumps(
            {
                "bundle": str(result.bundle_dir),
                "epochs": state.epoch,
                "steps": state.step,
                "best_epoch": state.best_epoch,
                "best_val_loss": state.best_val_loss if state.best_epoch >= 0 else None,
                "selected_by": config.select_by,
            }
        )
    )
    return 0


EVAL_DESCRIPTION = """\
Retrieval scores of a model bundle on one split of a manifest, printed as one JSON
object: text_to_image and image_to_text recall@1/5/10, and with --label-column
image_to_image precision@5/10/50 in the encoder and projection spaces. Keys starting
with random/ give what chance scores on the same task.

--linear-probe adds the paper's label-efficiency classification: a logistic
regression (standardised frozen encoder features h_v, C=1.0 fixed, lbfgs) fitted on
a fraction of the labelled 'train' rows of the same manifest and scored on the split:
linear_probe/<F>%/accuracy and /macro_auc (one-vs-rest ROC-AUC averaged over the
classes), the mean over --probe-seeds class-stratified random subsets below 100%
with _std beside it; random/linear_probe/accuracy is the majority-class rate."""


def eval_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "convirt eval",
        EVAL_DESCRIPTION,
        epilog=(
            "examples:\n"
            "  convirt eval --model B --manifest M --label-column location_category \\\n"
            "      --linear-probe --baseline imagenet --format table\n"
            "  convirt eval --model B --manifest roco/manifest.csv --pool 2000 --min-words 5"
        ),
    )
    add_model_option(parser)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--split", default="dev", help="split to score (default: dev; 'all': all)")
    parser.add_argument("--label-column", help="manifest column for image-to-image precision")
    parser.add_argument(
        "--queries", type=Path,
        help="CSV with label,text columns: label_text_to_image precision (needs --label-column)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", choices=["imagenet"],
        help="also score the untrained ImageNet image encoder (imagenet/... keys)",
    )  # fmt: skip
    parser.add_argument(
        "--text-mode", default="full", choices=["full", "sentences", "imaging-sentences"],
        help="embed a report whole, or as the mean of its (imaging) sentences",
    )  # fmt: skip
    parser.add_argument(
        "--all-images", action="store_true",
        help="also use images without a report (default: only the image/report pairs)",
    )  # fmt: skip
    parser.add_argument(
        "--linear-probe", action="store_true",
        help="linear-probe classification of --label-column (fitted on split 'train'; "
        "linear_probe/... keys, imagenet/linear_probe/... with --baseline imagenet)",
    )  # fmt: skip
    parser.add_argument(
        "--fractions", type=_fractions, default="0.01,0.1,1.0", metavar="F,F,...",
        help="shares of the labelled train rows the probe is fitted on (default: 0.01,0.1,1.0); "
        "a subset keeps at least 2 rows of 2 classes, and one per class when it has room",
    )  # fmt: skip
    parser.add_argument(
        "--probe-seeds", type=int, default=5, metavar="N",  # probe.DEFAULT_SEEDS: not imported,
        # as it would load scikit-learn for `convirt train` too
        help="random subsets per fraction below 1, averaged (default: 5)",
    )  # fmt: skip
    parser.add_argument(
        "--pool", type=int, metavar="N",
        help="score a seeded random sample of N pairs of the split (ROCO-2k: 2000); all of them "
        "when fewer are eligible (pool_size < pool_requested, and a warning)",
    )  # fmt: skip
    parser.add_argument(
        "--min-words", type=int, default=0, metavar="M",
        help="keep only pairs whose caption has at least M whitespace-separated words, before "
        "the pool is drawn",
    )  # fmt: skip
    parser.add_argument(
        "--pool-seed", type=int, default=0, help="seed of the --pool sample (default: 0)"
    )
    parser.add_argument(
        "--tta", choices=["flip"],
        help="test-time augmentation: every image vector (encoder and joint space, so every "
        "score: text-image, image-image, linear probe, baseline) becomes the normalised mean of "
        "the image's and its left-right mirror's",
    )  # fmt: skip
    add_device_option(parser, default="cpu")
    parser.add_argument(
        "--cache", type=Path, help="image cache folder (default: $CONVIRT_CACHE_DIR/images)"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--format", choices=["json", "table"], default="json",
        help="print JSON (default) or a table beside the ImageNet baseline and chance",
    )  # fmt: skip
    add_no_progress_option(parser)
    return parser


def _fractions(text: str) -> tuple[float, ...]:
    """--fractions: comma-separated shares in (0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1]: {text!r}")
    return values


def _eval_usage_error(args: argparse.Namespace) -> str | None:
    if args.queries and not args.label_column:
        return "--queries needs --label-column"
    if args.linear_probe and not args.label_column:
        return "--linear-probe needs --label-column"
    if args.linear_probe and args.split in ("train", "all"):
        return "--linear-probe is fitted on split 'train': score another --split"
    if args.probe_seeds < 1:
        return "--probe-seeds must be at least 1"
    if args.pool is not None and args.pool < 1:
        return "--pool must be at least 1"
    if args.min_words < 0:
        return "--min-words must be at least 0"
    return None


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    from convirt.bundle import BundleError, load_bundle

    from .evaluate import evaluate, format_table

    error = _eval_usage_error(args)
    if error:
        print(f"convirt eval: {error}", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.model, device=args.device)
        result = evaluate(
            bundle, args.manifest, None if args.split == "all" else args.split,
            label_column=args.label_column, queries_csv=args.queries, baseline=args.baseline,
            text_mode=args.text_mode, all_images=args.all_images, device=args.device,
            progress=not args.no_progress, cache_dir=args.cache,
            linear_probe=args.linear_probe, fractions=args.fractions,
            probe_seeds=args.probe_seeds, pool=args.pool, min_words=args.min_words,
            pool_seed=args.pool_seed, tta=args.tta,
        )  # fmt: skip
    except (BundleError, ValueError, FileNotFoundError, CacheError) as err:
        print(f"convirt eval: {err}", file=sys.stderr)
        return 2
    if result.get("pool_size", 0) < result.get("pool_requested", 0):
        print(
            f"convirt eval: warning: the pool has {result['pool_size']} pairs, fewer than the "
            f"{result['pool_requested']} requested: only {result['pool_size']} have a caption of "
            f"{args.min_words} words or more (recall@K is not comparable to a full pool's)",
            file=sys.stderr,
        )
    result = {"model": bundle.fingerprint, "split": args.split, **result}
    text = json.dumps(result, indent=2)
    print(text if args.format == "json" else format_table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0
