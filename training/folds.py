"""Selection that does not fit dev: validation folds carved out of the train split.

Why: the epoch and the config have been chosen on dev for a whole round, and dev (medpix R@10
0.45) has drifted above the held-out test split (0.35). With `holdout: {folds: K, fold: F}` a run
validates on fold F of each dataset's train split (grouped by case, else by report, so no case
has images on both sides) and trains on the rest; dev is not read. `cross_validate` runs every
fold and reports the mean and spread, which is what a config is chosen by; dev is then measured
once, as the confirmation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .config import HoldOut, TrainConfig
from .data import PairDataset, PairTable
from .validation import DevSplit

log = logging.getLogger(__name__)


def fold_of_rows(table: PairTable, name: str, folds: int, seed: int) -> np.ndarray:
    """Each row's fold: a hash of its group (its case, else its report), the dataset's name and
    the seed, so a case never straddles folds and the folds do not depend on row order."""
    out = np.empty(len(table), np.int64)
    for row in range(len(table)):
        case = -1 if table.case_ids is None else int(table.case_ids[row])
        group = f"case:{case}" if case >= 0 else f"text:{table.text(row)}"
        digest = hashlib.sha256(f"{seed}|{name}|{group}".encode()).hexdigest()
        out[row] = int(digest[:12], 16) % folds
    return out


def subset(table: PairTable, rows: np.ndarray) -> PairTable:
    """The rows of a table (texts renumbered to those still used)."""
    used, text_ids = np.unique(table.text_ids[rows], return_inverse=True)
    return PairTable(
        offsets=table.offsets[rows], heights=table.heights[rows], widths=table.widths[rows],
        text_ids=text_ids.astype(np.int32), texts=[table.texts[i] for i in used],
        positions=table.positions[rows],
        case_ids=None if table.case_ids is None else table.case_ids[rows],
    )  # fmt: skip


def concat(tables: list[PairTable]) -> PairTable:
    """Tables of one image cache side by side; reports and cases stay apart per table."""
    texts, case_offset, parts = [], 0, []
    for table in tables:
        cases = table.case_ids if table.case_ids is not None else np.full(len(table), -1)
        parts.append((table, table.text_ids + len(texts), np.where(cases >= 0, cases + case_offset, -1)))  # fmt: skip
        texts += table.texts
        case_offset += int(cases.max(initial=-1)) + 1
    return PairTable(
        offsets=np.concatenate([t.offsets for t, _, _ in parts]),
        heights=np.concatenate([t.heights for t, _, _ in parts]),
        widths=np.concatenate([t.widths for t, _, _ in parts]),
        text_ids=np.concatenate([ids for _, ids, _ in parts]).astype(np.int32),
        texts=texts, positions=np.concatenate([t.positions for t, _, _ in parts]),
        case_ids=np.concatenate([c for _, _, c in parts]),
    )  # fmt: skip


def holdout_datasets(
    config: TrainConfig,
    manifests: list[Path],
    names: list[str],
    pairs: Callable[[list[Path], str, bool], PairDataset],
) -> tuple[PairDataset, list[DevSplit]]:
    """The train split less fold F (training pairs) and fold F of each dataset (validation)."""
    holdout = config.holdout
    if holdout.fold >= holdout.folds:
        raise ValueError(f"holdout fold {holdout.fold} of {holdout.folds}: folds count from 0")
    kept, held = [], []
    template = None
    for name, manifest in zip(names, manifests, strict=True):
        whole = pairs([manifest], config.train_split, True)
        template = whole
        fold = fold_of_rows(whole.table, name, holdout.folds, holdout.seed)
        kept.append(subset(whole.table, np.flatnonzero(fold != holdout.fold)))
        val = PairDataset(
            subset(whole.table, np.flatnonzero(fold == holdout.fold)), whole.reader, config.model,
            train=False, seed=config.seed, sentence_filter=config.sentence_filter,
            full_text_words=config.full_text_words,
        )  # fmt: skip
        held.append(DevSplit(name, val))
    train_set = PairDataset(
        concat(kept), template.reader, config.model, train=True, seed=config.seed,
        sentence_filter=config.sentence_filter, full_text_words=config.full_text_words,
    )  # fmt: skip
    log.info("holdout fold %d of %d: %d training pairs, %d held out", holdout.fold,
             holdout.folds, len(train_set), sum(len(d.dataset) for d in held))  # fmt: skip
    return train_set, held


def cross_validate(
    config: TrainConfig,
    manifests: list[Path],
    out_dir: Path,
    folds: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train once per fold (OUT/fold-F), validating on that fold; the best epoch's mean R@10
    per fold, their mean and range. Written to OUT/cv.json."""
    from .train import train

    scores = []
    for fold in range(folds):
        folded = config.model_copy(update={"holdout": HoldOut(folds=folds, fold=fold, seed=seed)})
        result = train(folded, manifests, out_dir / f"fold-{fold}", resume=True, progress=progress)
        scores.append(_best_recall(result.out_dir))
    summary = {"folds": folds, "seed": config.seed, "scores": scores,
               "mean": float(np.mean(scores)), "min": min(scores), "max": max(scores)}  # fmt: skip
    (out_dir / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _best_recall(run_dir: Path) -> float:
    """The kept epoch's mean held-out R@10, read from the run's (or stage 1's) bundle."""
    info = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    recall = info["provenance"].get("dev_recall_at_10") or {}
    values = [r for r in recall.values() if r == r]
    return float(np.mean(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    """python -m training.folds --config cpu --out DIR [--folds 5] [--set KEY=VALUE ...]"""
    from convirt.paths import default_manifests

    from .config import load_config, parse_assignments

    parser = argparse.ArgumentParser(prog="python -m training.folds", description=__doc__)
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--manifest", action="append", type=Path, dest="manifests")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_config(args.config, parse_assignments(args.set))
    manifests = args.manifests or default_manifests()
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(cross_validate(config, manifests, args.out, args.folds, args.fold_seed)))


if __name__ == "__main__":
    main()
