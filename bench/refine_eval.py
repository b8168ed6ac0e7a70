"""Refine by example, measured: P@10 before and after one round of Rocchio feedback.

Protocol (docs/results.md, "Refine by example (simulated user)"):

- Per dataset, an index of its dev split is built in place (index.write.build.build over the
  manifest's rows; nothing is copied) from the rows that have a report and a value in the label
  column `convirt eval` scores that dataset with (medpix `location_category`, covid-cxr
  `finding`, roco `modality_keyword`). Rows without a label are left out.
- Text queries: each distinct (caption, label) of those rows, embedded with the bundle, searched
  in the joint space; relevant = indexed images with the caption's own image's label.
  Image queries: each indexed image, searched by its stored encoder vector (itself excluded);
  relevant = the other images with its label.
- A simulated user looks at the top 10 once: every result with the query's label is liked, every
  other one disliked. The query moves by service.search.feedback.rocchio (default weights a=1, b=0.75,
  c=0.15) in the query's space and is searched again:
    (1) all feedback, disliked images excluded from the new results (the service default);
    (2) all feedback, nothing excluded: the vector's movement alone (pure Rocchio);
    (3) one like only, the best-ranked relevant result, nothing excluded (a lazy user);
    and a control: the same query with the disliked images excluded and no movement at all,
    which is what (1) owes to exclusion alone.
  A query with no relevant result in its top 10 gets dislikes only in (1)/(2) and no feedback in
  (3), where its P@10 stays as before; these queries are counted.
- Reported: P@10 before and after, the mean change with a 95% bootstrap interval over queries,
  and chance: the mean over queries of the share of candidates sharing the query's label.

    python bench/refine_eval.py --model runs/cpu/bundle
    python bench/refine_eval.py --model runs/cpu/bundle --datasets medpix --limit-queries 50
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convirt.paths import data_root
from index.read.store import IndexStore, open_current
from index.sources.base import Source
from index.sources.manifest import read_manifest
from index.write.build import Options, build
from service.search.feedback import Weights, rocchio

# the label column `convirt eval` scores each dataset's class-based metrics with (docs/results.md)
LABEL_COLUMNS = {"medpix": "location_category", "covid-cxr": "finding", "roco": "modality_keyword"}
K = 10
VARIANTS = ("exclude_only", "all_excluded", "all_kept", "one_like")
HEADERS = {
    "exclude_only": "control: dislikes excluded, query unmoved",
    "all_excluded": "(1) all 👍/👎, dislikes excluded",
    "all_kept": "(2) all 👍/👎, dislikes kept",
    "one_like": "(3) one 👍",
}


@dataclass
class Query:
    label: str
    vector: np.ndarray
    exclude: frozenset[int] = frozenset()  # the query image itself, for image queries


@dataclass
class Scores:
    """Per-query P@10 before and after each variant, and the chance level of each query."""

    before: list[float] = field(default_factory=list)
    after: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    new: dict[str, list[int]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    chance: list[float] = field(default_factory=list)
    no_relevant: int = 0


class Labelled:
    """An index of one dev split with the label of every image it holds."""

    def __init__(self, store: IndexStore, label_of: dict[int, str]):
        self.store = store
        self.label_of = label_of
        self.counts: dict[str, int] = {}
        for label in label_of.values():
            self.counts[label] = self.counts.get(label, 0) + 1

    def search(self, space: str, vector: np.ndarray, exclude: frozenset[int]) -> list[int]:
        return [hit.id for hit in self.store.search(space, vector, K, exclude=exclude)]

    def precision(self, ids: Sequence[int], label: str) -> float:
        return sum(self.label_of[i] == label for i in ids) / K


def one_round(index: Labelled, space: str, query: Query, weights: Weights, scores: Scores) -> None:
    """Search, simulate the user on the top 10, search again for each variant."""
    first = index.search(space, query.vector, query.exclude)
    liked = [i for i in first if index.label_of[i] == query.label]
    disliked = [i for i in first if index.label_of[i] != query.label]
    before = index.precision(first, query.label)
    scores.before.append(before)
    scores.no_relevant += not liked
    candidates = len(index.label_of) - len(query.exclude)
    scores.chance.append((index.counts[query.label] - len(query.exclude)) / candidates)

    def vectors(ids: Sequence[int]) -> np.ndarray:
        return index.store.vectors_of(list(ids), space)

    def after(variant: str, vector: np.ndarray | None, exclude: frozenset[int]) -> None:
        found = first if vector is None else index.search(space, vector, exclude)
        scores.after[variant].append(index.precision(found, query.label))
        # relevant images the user had not been shown: what the round brought that is new
        new = [i for i in found if i not in first and index.label_of[i] == query.label]
        scores.new[variant].append(len(new))

    without_disliked = query.exclude | frozenset(disliked)
    moved = rocchio(query.vector, vectors(liked), vectors(disliked), weights)
    after("exclude_only", query.vector, without_disliked)
    after("all_excluded", moved, without_disliked)
    after("all_kept", moved, query.exclude)
    lazy = rocchio(query.vector, vectors(liked[:1]), vectors([]), weights) if liked else None
    after("one_like", lazy, query.exclude)  # no like: no feedback, the same results


def split_source(manifest: Path, split: str, label_column: str) -> Source:
    """The split's rows with a report and a label, pointing at the images where they are."""
    source = read_manifest(manifest)
    items = [
        item
        for item in source.items
        if item.meta.get("split") == split and item.text and item.meta.get(label_column)
    ]
    if not items:
        raise SystemExit(f"{manifest}: no {split} row has a report and a {label_column!r} value")
    return Source(source.kind, source.location, items, [])


def indexed_paths(store: IndexStore) -> dict[str, int]:
    """Manifest path -> index id (a duplicated content maps every path to the id kept)."""
    id_of: dict[str, int] = {}
    for image_id, row in store.get_many([int(i) for i in store.ids]).items():
        for path in [row["path"], *row["duplicates"]]:
            id_of[path] = image_id
    return id_of


def labels_of(source: Source, id_of: dict[str, int], label_column: str) -> dict[int, str]:
    """Index id -> label, for the images the build kept (an unreadable one is skipped)."""
    label_of: dict[int, str] = {}
    for item in source.items:
        image_id = id_of.get(str(item.path))
        if image_id is None:
            continue
        label = item.meta[label_column]
        if label_of.setdefault(image_id, label) != label:
            raise SystemExit(f"{item.path}: one image content with two labels in {label_column}")
    return label_of


def evaluate_dataset(
    name: str, args: argparse.Namespace, bundle, embedder, root: Path
) -> dict[str, Scores | int]:
    label_column = LABEL_COLUMNS[name]
    source = split_source(args.data_root / name / "manifest.csv", args.split, label_column)
    options = Options(workers=args.workers, progress=False)
    build(root, bundle, source, options)
    weights = Weights(args.a, args.b, args.c)
    with open_current(root) as store:
        id_of = indexed_paths(store)
        label_of = labels_of(source, id_of, label_column)
        index = Labelled(store, label_of)
        # text: one query per distinct (caption, label); the same caption twice says nothing new
        pairs = sorted(
            {(i.text, i.meta[label_column]) for i in source.items if str(i.path) in id_of}
        )
        image_ids = sorted(label_of)
        if args.limit_queries:
            pairs = _subsample(pairs, args.limit_queries)
            image_ids = _subsample(image_ids, args.limit_queries)
        texts = embedder.embed_texts([text for text, _ in pairs]).vectors
        text_scores, image_scores = Scores(), Scores()
        for (_, label), vector in zip(pairs, texts, strict=True):
            one_round(index, "joint", Query(label, vector), weights, text_scores)
        stored = store.vectors_of(image_ids, "encoder")
        for image_id, vector in zip(image_ids, stored, strict=True):
            query = Query(label_of[image_id], vector, frozenset([image_id]))
            one_round(index, "encoder", query, weights, image_scores)
        return {"images": store.count, "text": text_scores, "image": image_scores}


def _subsample(values: list, limit: int) -> list:
    """At most `limit` values, evenly spread over the sorted list (deterministic)."""
    if len(values) <= limit:
        return values
    picks = np.linspace(0, len(values) - 1, limit).round().astype(int)
    return [values[i] for i in picks]


def bootstrap(deltas: np.ndarray, rounds: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of `deltas`, resampling queries."""
    if len(deltas) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = deltas[rng.integers(0, len(deltas), size=(rounds, len(deltas)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(scores: Scores, rounds: int, seed: int) -> dict:
    before = np.asarray(scores.before)
    out = {
        "queries": len(before),
        "no_relevant_in_top10": scores.no_relevant,
        "chance": float(np.mean(scores.chance)) if scores.chance else float("nan"),
        "before": float(before.mean()) if len(before) else float("nan"),
    }
    for variant in VARIANTS:
        after = np.asarray(scores.after[variant])
        deltas = after - before
        low, high = bootstrap(deltas, rounds, seed)
        out[variant] = {
            "after": float(after.mean()) if len(after) else float("nan"),
            "change": float(deltas.mean()) if len(deltas) else float("nan"),
            "ci95": [low, high],
            "new_relevant": float(np.mean(scores.new[variant])) if before.size else float("nan"),
        }
    return out


def markdown(rows: list[dict]) -> str:
    """Two tables: P@10 before and after each variant, then what each round brought that is new."""
    head = ["dataset (images)", "query", "n", "none relevant", "chance", "P@10 before"]
    head += [HEADERS[v] for v in VARIANTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            *_row_start(row),
            str(row["queries"]),
            str(row["no_relevant_in_top10"]),
            f"{row['chance']:.3f}",
            f"{row['before']:.3f}",
        ]
        for variant in VARIANTS:
            v = row[variant]
            low, high = v["ci95"]
            cells.append(f"{v['after']:.3f} ({v['change']:+.3f} [{low:+.3f}, {high:+.3f}])")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Relevant images in the refined top 10 that the first top 10 did not show:", ""]
    head = ["dataset (images)", "query"] + [HEADERS[v] for v in VARIANTS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [*_row_start(row), *(f"{row[v]['new_relevant']:.2f}" for v in VARIANTS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row_start(row: dict) -> list[str]:
    return [f"{row['dataset']} ({row['images']})", row["query"]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, required=True, help="model bundle folder")
    parser.add_argument(
        "--datasets",
        default=",".join(LABEL_COLUMNS),
        help=f"comma-separated, of {', '.join(LABEL_COLUMNS)} (default: all)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding DATASET/manifest.csv (default: $CONVIRT_DATA_ROOT or "
        "../shared/datasets)",
    )
    parser.add_argument("--split", default="dev", help="split to index and query (default: dev)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to build the per-dataset indexes (OUT/DATASET, kept); default: a temporary "
        "folder, removed at the end",
    )
    parser.add_argument(
        "--limit-queries",
        type=int,
        default=None,
        metavar="N",
        help="at most N text and N image queries per dataset, evenly spread (quick runs)",
    )
    parser.add_argument("--a", type=float, default=Weights.query, help="query weight (1.0)")
    parser.add_argument("--b", type=float, default=Weights.liked, help="liked weight (0.75)")
    parser.add_argument("--c", type=float, default=Weights.disliked, help="disliked weight (0.15)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap rounds (2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    parser.add_argument("--workers", type=int, default=2, help="index build workers (2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (its default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    args.data_root = (args.data_root or data_root()).resolve()
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in args.datasets if d not in LABEL_COLUMNS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}: use {', '.join(LABEL_COLUMNS)}")
    if args.limit_queries is not None and args.limit_queries < 1:
        parser.error("--limit-queries must be 1 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    from convirt.bundle import load_bundle
    from convirt.inference import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    embedder = Embedder(bundle)
    rows = []
    with tempfile.TemporaryDirectory(prefix="refine-eval-") as scratch:
        out = args.out or Path(scratch)
        for name in args.datasets:
            t0 = time.monotonic()
            result = evaluate_dataset(name, args, bundle, embedder, out / name)
            for kind in ("text", "image"):
                summary = summarise(result[kind], args.bootstrap, args.seed)
                rows.append({"dataset": name, "images": result["images"], "query": kind, **summary})
            print(f"{name}: {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print(markdown(rows))
    print()
    print("Cells: P@10 after (mean change [95% bootstrap interval]).")
    command = ["python", "bench/refine_eval.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"Command: {shlex.join(command)}")
    print(f"Bundle: {args.model.resolve()}; runtime {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "argv": command}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
