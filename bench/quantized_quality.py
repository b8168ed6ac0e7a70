"""The int8 query encoder against fp32: retrieval quality on the dev splits, and encode latency.

Quality (docs/results.md "Int8 query encoder"): on each dev split (medpix, covid-cxr, roco) the
images are embedded once by the bundle's fp32 model, as the index holds them; the split's
distinct reports (the `convirt eval` text->image protocol) and the first imaging sentence of each
(what a user types) are embedded by fp32 and by each int8 encoder, and compared: mean top-10
overlap with fp32's ranking, text->image recall@10 of both, and the cosine of the two vectors.
The int8 encoders: this project's (`int8-onnx`: convirt.quantize, ONNX Runtime, per-token
activation scales, smoothed) and torch's stock dynamic quantisation (`int8-torch`:
torch.ao.quantization.quantize_dynamic on every nn.Linear of the text tower, per-tensor
activation scales).

Speed (--speed; docs/benchmarks.md): encode time of one sentence and of 32 sentences (medpix dev
captions' first imaging sentences, through Embedder.embed_texts as the service calls it), each
encoder in its own process (two thread pools in one process slow each other), in rounds that
alternate the encoders; medians over the rounds, and ratios to fp32 within each round.

    python bench/quantized_quality.py --model runs/demo-cpu/bundle
    python bench/quantized_quality.py --model runs/demo-cpu/bundle --speed --rounds 5

The bundle's int8/ artefact is used when it has one, else one is written to a temporary folder
(the bundle is never written to). Prints JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convirt.bundle import Bundle, load_bundle
from convirt.inference import Embedder
from convirt.paths import PAIRED_DATASETS, data_root
from convirt.quantize import MODEL_NAME, Int8TextEncoder, check_int8, int8_dir, write_int8
from convirt.sentences import report_sentences

K = 10
ENCODERS = ("fp32", "int8-torch", "int8-onnx")


def torch_dynamic(bundle: Bundle):
    """torch's stock dynamic int8: every nn.Linear of a copy of the text tower."""
    model = copy.deepcopy(bundle.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
        model.text_encoder = torch.ao.quantization.quantize_dynamic(
            model.text_encoder, {nn.Linear}, dtype=torch.qint8
        )
        model.text_head = torch.ao.quantization.quantize_dynamic(
            model.text_head, {nn.Linear}, dtype=torch.qint8
        )
    return lambda ids, mask: model.encode_text(ids, mask)[1]


def embedders(bundle: Bundle, onnx_path: Path, threads: int, names=ENCODERS) -> dict:
    out = {}
    for name in names:
        if name == "fp32":
            out[name] = Embedder(bundle)
        elif name == "int8-torch":
            out[name] = Embedder(bundle, text_encoder=torch_dynamic(bundle))
        else:
            out[name] = Embedder(bundle, text_encoder=Int8TextEncoder(onnx_path, {}, threads))
    return out


def int8_model(bundle: Bundle, tmp: Path) -> tuple[Path, str]:
    """(text.onnx, where it came from): the bundle's own, else one written into tmp."""
    assert bundle.path is not None
    if check_int8(bundle.path, bundle.fingerprint) is not None:
        return int8_dir(bundle.path) / MODEL_NAME, "the bundle's int8/"
    write_int8(bundle, tmp)
    return tmp / MODEL_NAME, "written for this run (the bundle has no int8/)"


def compare(exact: np.ndarray, other: np.ndarray, images: np.ndarray, relevant: np.ndarray | None):
    def top(vectors: np.ndarray) -> np.ndarray:
        return np.argsort(-(vectors @ images.T), axis=1, kind="stable")[:, :K]

    a, b = top(exact), top(other)
    row = {
        "top10_overlap": round(
            float(np.mean([len(set(x) & set(y)) / K for x, y in zip(a, b, strict=True)])), 3
        ),
        "cosine_to_fp32": round(float(np.mean(np.sum(exact * other, axis=1))), 5),
    }
    if relevant is not None:
        hits = np.take_along_axis(relevant, b, axis=1).any(axis=1)
        row["recall@10"] = round(float(hits.mean()), 3)
        row["queries_hit"] = int(hits.sum())
    return row


def quality(bundle: Bundle, encoders: dict, progress: bool) -> dict:
    from training.evaluate import embed_images, scored_records

    out = {}
    for name in PAIRED_DATASETS:
        records = scored_records(data_root() / name / "manifest.csv", "dev", False)
        split_embeddings = embed_images(records, encoders["fp32"], progress=progress)
        records, images = split_embeddings.records, split_embeddings.image_projections
        texts = [r.text for r in records]
        reports = sorted(set(texts))
        index = {t: j for j, t in enumerate(reports)}
        relevant = np.arange(len(reports))[:, None] == np.array([index[t] for t in texts])[None]
        sentences = [s[0] for s in (report_sentences(t, "imaging")[:1] for t in reports) if s]
        split: dict = {"images": len(records), "reports": len(reports), "sentences": len(sentences)}
        exact_reports = encoders["fp32"].embed_texts(reports).vectors
        exact_sentences = encoders["fp32"].embed_texts(sentences).vectors
        hits = np.take_along_axis(
            relevant, np.argsort(-(exact_reports @ images.T), axis=1)[:, :K], axis=1
        ).any(axis=1)
        split["fp32"] = {"recall@10": round(float(hits.mean()), 3), "queries_hit": int(hits.sum())}
        for encoder, embedder in encoders.items():
            if encoder == "fp32":
                continue
            split[encoder] = {
                "reports": compare(
                    exact_reports, embedder.embed_texts(reports).vectors, images, relevant
                ),
                "sentences": compare(
                    exact_sentences, embedder.embed_texts(sentences).vectors, images, None
                ),
            }
        out[name] = split
    return out


def query_sentences() -> list[str]:
    import csv

    with open(data_root() / "medpix" / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "dev" and r["text"].strip()]
    return [s[0] for s in (report_sentences(r["text"], "imaging")[:1] for r in rows) if s]


def time_one(model: Path, onnx_path: Path, encoder: str, threads: int) -> dict:
    """Encode latency of one encoder in this process: one sentence at a time, and 32 at once."""
    torch.set_num_threads(threads)
    embedder = embedders(load_bundle(model), onnx_path, threads, [encoder])[encoder]
    sentences = query_sentences()
    for text in sentences[:10]:
        embedder.embed_texts([text])  # warm-up
    one, batch = [], []
    for repeat in range(2):
        for text in sentences[:60]:
            started = time.perf_counter()
            embedder.embed_texts([text])
            one.append(time.perf_counter() - started)
        for start in range(0, 96, 32):
            started = time.perf_counter()
            embedder.embed_texts(sentences[start + repeat : start + repeat + 32])
            batch.append(time.perf_counter() - started)
    return {
        "one_ms": round(1000 * statistics.median(one), 2),
        "batch32_ms": round(1000 * statistics.median(batch), 1),
    }


def speed(model: Path, onnx_path: Path, rounds: int, threads: list[int]) -> dict:
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for count in threads:
            for encoder in ENCODERS:
                command = [sys.executable, __file__, "--model", str(model), "--time", encoder,
                           "--threads", str(count), "--onnx", str(onnx_path)]  # fmt: skip
                result = subprocess.run(command, check=True, capture_output=True, text=True)
                runs.setdefault(f"{encoder}/{count}", []).append(json.loads(result.stdout))
    out = {}
    for key, values in runs.items():
        encoder, count = key.split("/")
        base = runs[f"fp32/{count}"]
        out[key] = {
            "one_ms": statistics.median(v["one_ms"] for v in values),
            "batch32_ms": statistics.median(v["batch32_ms"] for v in values),
            "one_over_fp32": round(
                statistics.median(
                    v["one_ms"] / b["one_ms"] for v, b in zip(values, base, strict=True)
                ),
                2,
            ),
            "batch32_over_fp32": round(
                statistics.median(
                    v["batch32_ms"] / b["batch32_ms"] for v, b in zip(values, base, strict=True)
                ),
                2,
            ),
            "rounds": values,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model bundle")
    parser.add_argument("--speed", action="store_true", help="also time the encoders")
    parser.add_argument("--no-quality", action="store_true", help="only time the encoders")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (--speed)")
    parser.add_argument(
        "--threads", default="2", help="intra-op threads to time, comma-separated (--speed)"
    )
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--time", choices=ENCODERS, help=argparse.SUPPRESS)  # one timing process
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:
        print(json.dumps(time_one(args.model, args.onnx, args.time, int(args.threads))))
        return
    bundle = load_bundle(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, origin = int8_model(bundle, Path(tmp))
        load = os.getloadavg()
        report: dict = {
            "bundle": str(args.model),
            "fingerprint": bundle.fingerprint,
            "int8_onnx": origin,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "load_average_at_start": [round(x, 2) for x in load],
        }
        if not args.no_quality:
            encoders = embedders(bundle, onnx_path, torch.get_num_threads())
            report["quality"] = quality(bundle, encoders, args.progress)
        if args.speed or args.no_quality:
            threads = [int(n) for n in args.threads.split(",")]
            report["speed"] = speed(args.model, onnx_path, args.rounds, threads)
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
