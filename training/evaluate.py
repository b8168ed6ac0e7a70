"""`convirt eval`: retrieval figures of a bundle on a split, beside the ImageNet baseline and chance.

Protocols (DESIGN.md):
- text_to_image/recall@K: each distinct report is a query; a hit when an image paired with that
  same report is in the top K.
- image_to_text/recall@K: each image with a report queries the distinct reports; a hit when its own
  report is in the top K.
- image_to_image/{encoder,projection}/precision@K: each labelled image queries the others (itself
  excluded); precision = share of the top K with the same label. "encoder" is h_v, "projection" v.
- label_text_to_image/precision@K: a queries CSV (label, text), the paper's CheXpert 8x200 protocol.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from convirt.bundle import Bundle, initial_image_encoder
from convirt.cachebuild import Resolver
from convirt.imagecache import ImageCache
from convirt.inference import Embedder
from convirt.manifest import ManifestItem, read_manifest
from convirt.sentences import report_sentences

from . import metrics
from .data import PairDataset, pair_table, report_skips

RECALL_KS = (1, 5, 10)
PRECISION_KS = (5, 10, 50)


@dataclass
class SplitEmbeddings:
    records: list[ManifestItem]
    image_features: np.ndarray  # h_v / |h_v|
    image_projections: np.ndarray  # v / |v|


def load_split(manifest: Path, split: str | None, text_column: str = "text") -> list[ManifestItem]:
    records, skipped = read_manifest(manifest, split, text_column=text_column)
    report_skips(skipped, f"{manifest} [{split}]")
    if not records:
        raise ValueError(f"{manifest}: no images in split {split!r}")
    return records


def embed_images(
    records: Sequence[ManifestItem],
    embedder: Embedder,
    image_encoder: torch.nn.Module | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> SplitEmbeddings:
    """Eval-view embeddings of every readable image (unreadable ones are dropped and reported),
    read through the image cache."""
    cache, side = ImageCache(cache_dir), embedder.bundle.config.resize
    resolver = Resolver(cache, side, progress=progress, desc="images")
    table, skipped = pair_table(resolver.resolve(records))
    report_skips(skipped, "eval images")
    dataset = PairDataset(table, cache.reader(side), embedder.bundle.config, train=False)
    cache.close()
    keys = [(0, i) for i in range(len(dataset))]
    batches = [keys[i : i + embedder.batch_size] for i in range(0, len(keys), embedder.batch_size)]
    loader = DataLoader(
        dataset, batch_sampler=batches, collate_fn=lambda b: torch.stack([x[0] for x in b])
    )
    features, projections = [], []
    for pixels in tqdm(loader, desc="embedding images", disable=not progress):
        if image_encoder is None:
            h, v = embedder.embed_pixels(pixels)
        else:  # baseline: another (ImageNet) encoder's features; it has no projection head
            with torch.inference_mode():
                h = F.normalize(image_encoder(pixels.to(embedder.device)).float(), dim=-1)
            h = v = h.cpu().numpy()
        features.append(h)
        projections.append(v)
    kept = [records[i] for i in table.positions]
    return SplitEmbeddings(kept, np.concatenate(features), np.concatenate(projections))


TEXT_MODES = {"full": None, "sentences": "none", "imaging-sentences": "imaging"}


def embed_reports(texts: Sequence[str], embedder: Embedder, text_mode: str) -> np.ndarray:
    """One joint-space vector per report: the whole text ("full"), or the normalised mean of its
    sentence vectors ("sentences", or "imaging-sentences" for those describing the image)."""
    if text_mode not in TEXT_MODES:
        raise ValueError(f"unknown text mode {text_mode!r}: use one of {', '.join(TEXT_MODES)}")
    if TEXT_MODES[text_mode] is None:
        return embedder.embed_texts(list(texts)).vectors
    per_report = [report_sentences(t, TEXT_MODES[text_mode]) or [t] for t in texts]
    vectors = embedder.embed_texts([s for sentences in per_report for s in sentences]).vectors
    out, start = [], 0
    for sentences in per_report:
        mean = vectors[start : start + len(sentences)].mean(axis=0)
        out.append(mean / max(np.linalg.norm(mean), 1e-12))
        start += len(sentences)
    return np.stack(out) if out else np.zeros((0, embedder.dim), np.float32)


def text_image_metrics(
    split: SplitEmbeddings, embedder: Embedder, text_mode: str
) -> dict[str, float]:
    with_text = [i for i, r in enumerate(split.records) if r.text]
    if not with_text:
        return {}
    reports = sorted({split.records[i].text for i in with_text})
    report_index = {t: j for j, t in enumerate(reports)}
    report_vectors = embed_reports(reports, embedder, text_mode)
    image_report = np.array([report_index.get(r.text, -1) for r in split.records])
    # text -> image over all images; image -> text over images that have a report
    t2i_scores = report_vectors @ split.image_projections.T
    t2i_relevant = np.arange(len(reports))[:, None] == image_report[None, :]
    i2t_scores = split.image_projections[with_text] @ report_vectors.T
    i2t_relevant = image_report[with_text][:, None] == np.arange(len(reports))[None, :]
    out = {"n_reports": len(reports), "n_images_with_report": len(with_text)}
    for k in RECALL_KS:
        out[f"text_to_image/recall@{k}"] = metrics.recall_at_k(t2i_scores, t2i_relevant, k)
        out[f"image_to_text/recall@{k}"] = metrics.recall_at_k(i2t_scores, i2t_relevant, k)
        out[f"random/text_to_image/recall@{k}"] = metrics.random_recall_at_k(t2i_relevant, k)
        out[f"random/image_to_text/recall@{k}"] = metrics.random_recall_at_k(i2t_relevant, k)
    return out


def image_image_metrics(split: SplitEmbeddings, label_column: str) -> dict[str, float]:
    labels = np.array([r.meta.get(label_column, "") for r in split.records])
    if label_column and not any(labels):
        raise ValueError(f"no image has a value in label column {label_column!r}")
    labelled = np.flatnonzero(labels != "")
    same = labels[labelled][:, None] == labels[labelled][None, :]
    np.fill_diagonal(same, False)
    out = {"n_labelled_images": len(labelled)}
    spaces = {"encoder": split.image_features, "projection": split.image_projections}
    for space, vectors in spaces.items():
        vectors = vectors[labelled]
        scores = metrics.exclude_self(vectors @ vectors.T)
        for k in PRECISION_KS:
            out[f"image_to_image/{space}/precision@{k}"] = metrics.precision_at_k(scores, same, k)
    # chance: the diagonal must not count as a candidate
    n = len(labelled)
    for k in PRECISION_KS:
        out[f"random/image_to_image/precision@{k}"] = float(same.sum(axis=1).mean() / max(1, n - 1))
    return out


def label_query_metrics(
    split: SplitEmbeddings, embedder: Embedder, queries_csv: Path, label_column: str
) -> dict[str, float]:
    with open(queries_csv, newline="", encoding="utf-8") as f:
        queries = [(row["label"], row["text"]) for row in csv.DictReader(f)]
    if not queries:
        raise ValueError(f"{queries_csv}: no queries (expected columns label,text)")
    labels = np.array([r.meta.get(label_column, "") for r in split.records])
    vectors = embedder.embed_texts([t for _, t in queries]).vectors
    scores = vectors @ split.image_projections.T
    relevant = np.array([label for label, _ in queries])[:, None] == labels[None, :]
    out = {}
    for k in PRECISION_KS:
        out[f"label_text_to_image/precision@{k}"] = metrics.precision_at_k(scores, relevant, k)
        out[f"random/label_text_to_image/precision@{k}"] = metrics.random_precision_at_k(
            relevant, k
        )
    return out


def evaluate(
    bundle: Bundle,
    manifest: Path,
    split: str | None,
    label_column: str | None = None,
    queries_csv: Path | None = None,
    baseline: str | None = None,
    text_mode: str = "full",
    all_images: bool = False,
    device: str = "cpu",
    progress: bool = True,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    """Every metric the inputs allow, as one flat dict (prefixed keys for baseline and chance).

    By default only images with a report take part (the pairs, as in DESIGN.md's reference table);
    `all_images` adds the image-only rows as queries and distractors.
    """
    embedder = Embedder(bundle, device=device)
    records = load_split(manifest, split)
    if not all_images:
        records = [r for r in records if r.text] or records
    split_embeddings = embed_images(records, embedder, progress=progress, cache_dir=cache_dir)
    result: dict[str, float] = {"n_images": len(split_embeddings.records)}
    result |= text_image_metrics(split_embeddings, embedder, text_mode)
    if label_column:
        result |= image_image_metrics(split_embeddings, label_column)
        if queries_csv:
            result |= label_query_metrics(split_embeddings, embedder, queries_csv, label_column)
    if baseline == "imagenet":
        encoder = initial_image_encoder(bundle.config).to(device).eval()
        base = embed_images(
            split_embeddings.records, embedder, encoder, progress=progress, cache_dir=cache_dir
        )
        if label_column:
            for key, value in image_image_metrics(base, label_column).items():
                if key.startswith("image_to_image/encoder/"):
                    result[f"imagenet/{key}"] = value
    return result


def format_table(result: dict[str, float]) -> str:
    """The metrics as a text table: model | ImageNet baseline | chance."""
    rows = [("metric", "model", "imagenet", "random")]
    for key, value in result.items():
        if "/" not in key or key.startswith(("random/", "imagenet/")):
            continue
        chance_key = "random/" + key.replace("/encoder/", "/").replace("/projection/", "/")
        rows.append(
            (
                key,
                f"{value:.3f}",
                _cell(result.get(f"imagenet/{key}")),
                _cell(result.get(chance_key)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
