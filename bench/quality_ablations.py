"""The short protocol behind docs/results.md's "what was tried" table: one `cpu` variant per run.

Each variant trains for one epoch over the covid-cxr, medpix and roco train splits (149 steps of
32) and is scored by text->image recall@10 on each dev split: from metrics.csv when the epoch
ended, else (a variant stopped earlier to spend the same time) by `convirt eval` on its bundle.
The same run twice with another seed gives the run-to-run spread every difference is read
against. One epoch is far from a finished run: a variant that loses here may still win at
full length (a cosine decay, for one, ends within the epoch), so the table says which.

    python bench/quality_ablations.py --out runs/ablations            # every variant (~1 h)
    python bench/quality_ablations.py --out runs/ablations base ema   # some of them
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from convirt.paths import PAIRED_DATASETS, data_root

# name -> extra `convirt train` flags (on top of --config cpu --epochs 1)
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "base-seed1": ["--seed", "1"],
    "full-caption-30": ["--set", "full_text_words=30"],
    "cosine": ["--set", "lr_schedule=cosine", "--set", "warmup_steps=15"],
    "ema": ["--set", "ema_decay=0.99"],
    "learnt-temperature": ["--set", "learn_temperature=true"],
    # 224 px costs ~1.36x the pixels of 192 px: the same time buys ~110 of the 149 steps
    "224px": ["--image-size", "224", "--max-steps", "110"],
    # 80 masked-LM steps (~90 s on the idle box) then the ConVIRT steps left in the same time
    "pretrain-text": [
        "--set", "pretrain_text={max_steps: 80, minutes: 10, lr: 2.0e-4, warmup_steps: 10}",
        "--max-steps", "104",
    ],
}  # fmt: skip


def run_variant(name: str, out: Path) -> dict:
    run = out / name
    started = time.monotonic()
    if not (run / "bundle").exists():
        subprocess.run(
            [sys.executable, "-m", "convirt.cli", "train", "--config", "cpu", "--epochs", "1",
             "--out", str(run), "--no-progress", *VARIANTS[name]],
            check=True,
        )  # fmt: skip
    seconds = time.monotonic() - started
    metrics = run / "metrics.csv"
    rows = []
    if metrics.exists():
        with metrics.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if rows:
        recall = {d: float(rows[-1][f"dev_r10_{d}"]) for d in PAIRED_DATASETS}
    else:
        recall = {d: eval_recall(run / "bundle", d) for d in PAIRED_DATASETS}
    return {"variant": name, "seconds": round(seconds), **recall}


def eval_recall(bundle: Path, dataset: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "convirt.cli", "eval", "--model", str(bundle), "--manifest",
         str(data_root() / dataset / "manifest.csv"), "--split", "dev", "--no-progress"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)["text_to_image/recall@10"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs (reused)")
    parser.add_argument("variants", nargs="*", help=f"default: all of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    print("| variant | " + " | ".join(PAIRED_DATASETS) + " | mean | seconds |")
    print("|---" * (len(PAIRED_DATASETS) + 3) + "|")
    for name in names:
        row = run_variant(name, args.out)
        values = [row[d] for d in PAIRED_DATASETS]
        cells = " | ".join(f"{v:.3f}" for v in values)
        print(
            f"| {name} | {cells} | {sum(values) / len(values):.3f} | {row['seconds']} |", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
