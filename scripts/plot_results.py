"""Plots for docs/results.md: training curves of runs and recall@K of evaluation JSONs.

    python scripts/plot_results.py --run runs/cpu-a --eval medpix=runs/cpu-a/eval-medpix.json \
        --eval covid-cxr=runs/cpu-a/eval-covid-cxr.json --out docs/img
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_training(runs: list[Path], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        steps = read_csv(run / "steps.csv")
        x = [int(r["step"]) for r in steps]
        y = [float(r["loss"]) for r in steps]
        window = 16
        smooth = [
            sum(y[max(0, i - window + 1) : i + 1]) / len(y[max(0, i - window + 1) : i + 1])
            for i in range(len(y))
        ]
        (line,) = ax.plot(x, smooth, label=f"{run.name} train (moving mean of {window})")
        epochs = read_csv(run / "metrics.csv")
        ax.plot(
            [int(r["step"]) for r in epochs], [float(r["val_loss"]) for r in epochs], "o--",
            color=line.get_color(), label=f"{run.name} validation (dev)",
        )  # fmt: skip
    ax.set_xlabel("optimiser step (batch of 32)")
    ax.set_ylabel("ConVIRT loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_loss.png", dpi=120)


def plot_selection(runs: list[Path], out: Path) -> None:
    """Per epoch: mean dev text->image R@10 (what select_by: retrieval keeps) beside the
    validation loss (what the paper's early stopping watches)."""
    fig, (recall_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        epochs = [r for r in read_csv(run / "metrics.csv") if r.get("dev_r10")]
        if not epochs:
            continue
        x = [int(r["epoch"]) for r in epochs]
        recall = [float(r["dev_r10"]) for r in epochs]
        (line,) = recall_ax.plot(x, recall, "o-", label=f"{run.name}: mean")
        for column in (c for c in epochs[0] if c.startswith("dev_r10_")):
            recall_ax.plot(x, [float(r[column]) for r in epochs], ":", color=line.get_color(),
                           alpha=0.6, label=f"{run.name}: {column.removeprefix('dev_r10_')}")  # fmt: skip
        best = max(range(len(recall)), key=recall.__getitem__)
        recall_ax.plot(x[best], recall[best], "*", markersize=14, color=line.get_color())
        recall_ax.set_xticks(x)
        loss_ax.set_xticks(x)
        loss_ax.plot(x, [float(r["val_loss"]) for r in epochs], "o--", color=line.get_color(),
                     label=run.name)  # fmt: skip
    recall_ax.set_title("dev text→image R@10 (★ = exported epoch)")
    loss_ax.set_title("validation loss")
    for ax in (recall_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "selection.png", dpi=120)


def plot_recall(evals: dict[str, Path], out: Path) -> None:
    fig, axes = plt.subplots(1, len(evals), figsize=(4.5 * len(evals), 3.8), squeeze=False)
    for ax, (name, path) in zip(axes[0], evals.items(), strict=True):
        result = json.loads(path.read_text())
        ks = [1, 5, 10]
        for key, style in (("text_to_image", "o-"), ("image_to_text", "s-")):
            ax.plot(ks, [result[f"{key}/recall@{k}"] for k in ks], style, label=f"ConVIRT {key}")
        ax.plot(ks, [result[f"random/text_to_image/recall@{k}"] for k in ks], "k:", label="random")
        ax.set_title(f"{name} dev")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_xticks(ks)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", default=[])
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run:
        plot_training(args.run, args.out)
        plot_selection(args.run, args.out)
    if args.eval:
        plot_recall({k: Path(v) for k, v in (e.split("=", 1) for e in args.eval)}, args.out)


if __name__ == "__main__":
    main()
