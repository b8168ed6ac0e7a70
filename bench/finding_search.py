"""Finding search as a clinician judges it: precision of text queries by ranking mode.

Queries are finding phrases, never the target's own report, over one split of the demo archive
(default dev), one card per image, three query sets:

    everyday   bench/finding_queries.csv (56 findings as typed into a search box); relevance read
               by hand from the reports (bench/finding_judgments.csv: 1,227 judged pairs;
               unjudged images count as not relevant);
    diagnosis  every medpix `diagnosis` with 2+ images in the split; relevant: the same diagnosis;
    finding    every covid-cxr `finding` label with 2+ images; relevant: the same label.

Relevance never comes from the finding extractor the ranking uses. For each mode (image,
report, hybrid weighted, hybrid rrf) it prints precision@5/@10 and nDCG@10, and, for the
everyday set, the share of top-5 results whose report denies the queried finding (judged by
hand: a note such as "effusion explicitly denied"). It then scores `POST /v1/reports/suggest`
on the split's images: the findings its draft asserts against those the image's own report
asserts (micro precision/recall/F1), beside copying the nearest image's report and random
sentences.

    python bench/finding_search.py --model runs/demo-cpu/bundle --index runs/demo-index-cpu
    python bench/finding_search.py --split train --tune     # choose the hybrid weights on train

Figures: docs/results.md, "Finding search".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from convirt.bundle import load_bundle
from convirt.findings import mentions
from convirt.inference import Embedder
from index.read import hybrid
from index.read.store import open_current
from index.read.suggest import suggest

HERE = Path(__file__).parent
MODES = {
    "image": ("image", None),
    "report": ("report", "weighted"),
    "hybrid": ("hybrid", "weighted"),
    "hybrid-rrf": ("hybrid", "rrf"),
}
DENIED = re.compile(r"\b(denied|denies|absent|negated|no |not |excluded|ruled out|resolved)", re.I)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("runs/demo-cpu/bundle"))
    parser.add_argument("--index", type=Path, default=Path("runs/demo-index-cpu"))
    parser.add_argument("--split", default="dev", help="archive split to search (default dev)")
    parser.add_argument("--tune", action="store_true", help="grid-search the hybrid weights")
    parser.add_argument(
        "--weights", help="image,sentence,lexical for hybrid (default: index.read.hybrid)"
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--suggest-images", type=int, default=0, help="0: every image of the split")
    args = parser.parse_args()
    if args.weights:
        hybrid.WEIGHTS = hybrid.Weights(*map(float, args.weights.split(",")))

    store = open_current(args.index)
    embedder = Embedder(load_bundle(args.model), "cpu")
    rows = store.get_many(store.ids.tolist())
    in_split = {i: r for i, r in rows.items() if r["meta"].get("split") == args.split}
    by_path = {r["relpath"]: i for i, r in in_split.items()}
    print(f"index {args.index} version {store.version}: {len(in_split)} {args.split} images")
    sets = query_sets(in_split, by_path, args.split)
    results = {}
    if args.tune:
        tune(store, embedder, sets, args.split)
        return
    for name, queries in sets.items():
        results[name] = {}
        print(f"\n{name}: {len(queries)} queries")
        print(
            f"{'mode':12} {'P@5':>6} {'P@10':>6} {'nDCG@10':>8} {'denied@5':>9} {'judged@5':>9} {'ms':>6}"
        )
        for mode, (kind, fusion) in MODES.items():
            scores = evaluate(store, embedder, queries, kind, fusion, args.split)
            results[name][mode] = scores
            print(
                f"{mode:12} {scores['p5']:6.3f} {scores['p10']:6.3f} {scores['ndcg10']:8.3f} "
                f"{fmt(scores['denied5']):>9} {fmt(scores['judged5']):>9} {scores['ms']:6.1f}"
            )
    results["suggest"] = evaluate_suggest(store, in_split, args.suggest_images)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- queries -----------------------------------------------------------------------------------


def query_sets(in_split: dict, by_path: dict, split: str) -> dict[str, list[dict]]:
    sets: dict[str, list[dict]] = {}
    if split == "dev":
        judged: dict[str, dict[int, dict]] = defaultdict(dict)
        with open(HERE / "finding_judgments.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["image"] in by_path:
                    judged[row["query"]][by_path[row["image"]]] = row
        with open(HERE / "finding_queries.csv", newline="", encoding="utf-8") as f:
            everyday = []
            for row in csv.DictReader(f):
                marks = judged.get(row["query"], {})
                relevant = {i for i, j in marks.items() if j["relevant"] == "1"}
                denied = {
                    i for i, j in marks.items() if j["relevant"] == "0" and DENIED.search(j["note"])
                }
                if relevant:
                    everyday.append(
                        {
                            "text": row["query"],
                            "relevant": relevant,
                            "denied": denied,
                            "judged": set(marks),
                        }
                    )
        sets["everyday"] = everyday
    for name, field, dataset in (
        ("diagnosis", "diagnosis", "medpix"),
        ("finding", "finding", "covid-cxr"),
    ):
        groups: dict[str, set[int]] = defaultdict(set)
        for i, row in in_split.items():
            value = (row["meta"].get(field) or "").strip()
            if (
                row["meta"].get("dataset") == dataset
                and value
                and value.lower() not in ("todo", "unknown")
            ):
                groups[value].add(i)
        sets[name] = [
            {"text": value, "relevant": ids, "denied": None, "judged": None}
            for value, ids in sorted(groups.items())
            if len(ids) >= 2
        ]
    return sets


# -- ranking -----------------------------------------------------------------------------------


def ranked(store, vector, text, kind, fusion, split, k=10) -> list[int]:
    filters = {"split": split}
    if kind == "image":
        return [hit.id for hit in store.search("joint", vector, k, filters)]
    ranking = store.rank_text(vector, text, k, filters, mode=kind, fusion=fusion)
    return [hit.id for hit in ranking.top(k)]


def evaluate(store, embedder, queries, kind, fusion, split) -> dict:
    p5, p10, ndcg, denied5, judged5, took = [], [], [], [], [], []
    for query in queries:
        started = time.perf_counter()
        vector = embedder.embed_texts([query["text"]]).vectors[0]
        top = ranked(store, vector, query["text"], kind, fusion, split)
        took.append((time.perf_counter() - started) * 1000)
        relevant = query["relevant"]
        p5.append(sum(i in relevant for i in top[:5]) / 5)
        p10.append(sum(i in relevant for i in top[:10]) / 10)
        gains = sum(1 / math.log2(r + 2) for r, i in enumerate(top[:10]) if i in relevant)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(10, len(relevant))))
        ndcg.append(gains / ideal)
        if query["denied"] is not None:
            denied5.append(sum(i in query["denied"] for i in top[:5]) / 5)
            judged5.append(sum(i in query["judged"] for i in top[:5]) / 5)
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {
        "p5": mean(p5),
        "p10": mean(p10),
        "ndcg10": mean(ndcg),
        "denied5": mean(denied5),
        "judged5": mean(judged5),
        "ms": float(np.median(took)),
        "queries": len(queries),
    }


def tune(store, embedder, sets, split) -> None:
    """Hybrid weights on a grid (steps of 0.1), scored by mean P@5 over the diagnosis and
    finding sets of `split`: run it on train, then confirm the chosen weights on dev."""
    queries = [q for name in ("diagnosis", "finding") for q in sets[name]]
    print(f"tuning on {len(queries)} {split} queries (diagnosis + finding sets)")
    prepared = []
    for q in queries:
        vector = embedder.embed_texts([q["text"]]).vectors[0]
        prepared.append(
            (q, store.rank_text(vector, q["text"], 10, {"split": split}, mode="hybrid"))
        )
    grid = []
    steps = [x / 10 for x in range(11)]
    for image in steps:
        for sentence in steps:
            lexical = round(1 - image - sentence, 1)
            if lexical < 0:
                continue
            weights = hybrid.Weights(image, sentence, lexical)
            p5 = []
            for q, ranking in prepared:
                ranking.weights = weights
                top = [h.id for h in ranking.score(ranking.candidates)[:5]]
                p5.append(sum(i in q["relevant"] for i in top) / 5)
            grid.append((float(np.mean(p5)), weights))
    grid.sort(key=lambda g: -g[0])
    for p5, weights in grid[:10]:
        print(
            f"P@5 {p5:.3f}  image {weights.image:.1f} sentence {weights.sentence:.1f} lexical {weights.lexical:.1f}"
        )


# -- suggest -----------------------------------------------------------------------------------


def present_findings(text: str) -> set[str]:
    from convirt.sentences import split_sentences

    return {m.finding for s in split_sentences(text) for m in mentions(s) if m.status == "present"}


def prf(pairs: list[tuple[set[str], set[str]]]) -> dict:
    hit = sum(len(p & g) for p, g in pairs)
    predicted = sum(len(p) for p, _ in pairs)
    gold = sum(len(g) for _, g in pairs)
    precision = hit / predicted if predicted else 0.0
    recall = hit / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "images": len(pairs)}


def evaluate_suggest(store, in_split: dict, limit: int) -> dict:
    """Suggested findings against each image's own report, beside two baselines."""
    space = store.sentences
    rng = random.Random(0)
    asserting = np.flatnonzero(space.asserts)
    images = [i for i, r in sorted(in_split.items()) if present_findings(r["report"] or "")]
    images = images[:limit] if limit else images
    rows = store.get_many(store.ids.tolist())
    study = defaultdict(set)
    for i, r in rows.items():
        key = (
            r["meta"].get("case_id") or r["meta"].get("patient_id") or r["meta"].get("pmc_article")
        )
        if key:
            study[key].add(i)
    pairs = {"suggest": [], "nearest report": [], "random sentences": []}
    for image in images:
        gold = present_findings(in_split[image]["report"])
        meta = in_split[image]["meta"]
        key = meta.get("case_id") or meta.get("patient_id") or meta.get("pmc_article")
        exclude = {image, *study.get(key, ())}
        encoder, joint = (
            store.vectors_of([image], "encoder")[0],
            store.vectors_of([image], "joint")[0],
        )
        hits = store.search("encoder", encoder, 5, exclude=exclude)
        found = suggest(space, joint, [(h.id, h.score) for h in hits], 5)
        pairs["suggest"].append((set(found.draft), gold))
        nearest = next((h.id for h in hits if rows[h.id]["report"]), None)
        pairs["nearest report"].append(
            (present_findings(rows[nearest]["report"]) if nearest else set(), gold)
        )
        picked = rng.sample(list(asserting), 5)
        pairs["random sentences"].append(
            (
                {
                    m.finding
                    for s in picked
                    for m in mentions(space.texts[s])
                    if m.status == "present"
                },
                gold,
            )
        )
    print(f"\nsuggest: findings of the draft against the image's own report ({len(images)} images)")
    print(f"{'method':18} {'precision':>9} {'recall':>7} {'F1':>6}")
    scores = {}
    for name, got in pairs.items():
        scores[name] = prf(got)
        s = scores[name]
        print(f"{name:18} {s['precision']:9.3f} {s['recall']:7.3f} {s['f1']:6.3f}")
    counts = Counter(f for p, _ in pairs["suggest"] for f in p)
    print("most suggested:", ", ".join(f"{f} {n}" for f, n in counts.most_common(8)))
    return scores


if __name__ == "__main__":
    sys.exit(main())
