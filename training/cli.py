"""Command lines of `convirt train` and `convirt eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from convirt.imagecache import CacheError
from convirt.paths import DATA_ROOT_ENV, data_root

from .config import ConfigError, available_configs, load_config, parse_assignments

DEFAULT_DATASETS = ("covid-cxr", "medpix")


def default_manifests() -> list[Path]:
    return [data_root() / name / "manifest.csv" for name in DEFAULT_DATASETS]


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convirt train",
        description=(
            "Train ConVIRT on (image, report) pairs: one random sentence of each report against a "
            "random view of its image. Writes OUT/checkpoint.pt every epoch, OUT/metrics.csv and "
            "OUT/steps.csv, and the best epoch (lowest validation loss) as the bundle OUT/bundle. "
            "Run under torchrun for several GPUs."
        ),
        epilog=(
            "example: convirt train --config cpu --out runs/cpu\n"
            f"Manifests default to covid-cxr and medpix under ${DATA_ROOT_ENV} "
            f"(now {data_root()})."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
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
            }
        )
    )
    return 0


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convirt eval",
        description=(
            "Retrieval metrics of a model bundle on one split of a manifest, printed as one JSON "
            "object: text_to_image and image_to_text recall@1/5/10, and with --label-column "
            "image_to_image precision@5/10/50 in the encoder and projection spaces. Keys starting "
            "with random/ give what chance scores on the same task."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="bundle directory")
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cache", type=Path, help="image cache folder (default: $CONVIRT_CACHE_DIR/images)"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--format", choices=["json", "table"], default="json",
        help="print JSON (default) or a table beside the ImageNet baseline and chance",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    return parser


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    from convirt.bundle import BundleError, load_bundle

    from .evaluate import evaluate, format_table

    if args.queries and not args.label_column:
        print("convirt eval: --queries needs --label-column", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.model, device=args.device)
        result = evaluate(
            bundle, args.manifest, None if args.split == "all" else args.split,
            label_column=args.label_column, queries_csv=args.queries, baseline=args.baseline,
            text_mode=args.text_mode, all_images=args.all_images, device=args.device,
            progress=not args.no_progress, cache_dir=args.cache,
        )  # fmt: skip
    except (BundleError, ValueError, FileNotFoundError, CacheError) as err:
        print(f"convirt eval: {err}", file=sys.stderr)
        return 2
    result = {"model": bundle.fingerprint, "split": args.split, **result}
    text = json.dumps(result, indent=2)
    print(text if args.format == "json" else format_table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0
