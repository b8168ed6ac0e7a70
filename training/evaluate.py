"""`convirt eval`: retrieval figures of a bundle on a split, beside the ImageNet baseline and chance.

Protocols (DESIGN.md):
- text_to_image/recall@K: each distinct report is a query; a hit when an image paired with that
  same report is in the top K.
- image_to_text/recall@K: each image with a report queries the distinct reports; a hit when its own
  report is in the top K.
- image_to_image/{encoder,projection}/precision@K: each labelled image queries the others (itself
  excluded); precision = share of the top K with the same label. "encoder" is h_v, "projection" v.
- label_text_to_image/precision@K: a queries CSV (label, text), the paper's CheXpert 8x200 protocol.
- linear_probe/F/{accuracy,macro_auc}: a logistic regression on frozen h_v, fitted on a fraction F of
  the labelled train rows and scored on the split: the paper's label efficiency (training/probe.py).

Options: a pool (training/pool.py: a seeded sample of N pairs with captions of M words or more, the
ROCO-2k protocol) replaces the split's pairs; test-time augmentation "flip" makes every image vector
the normalised mean of the image's and its mirror image's.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
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
from convirt.manifest import ManifestItem, read_manifest_items
from convirt.sentences import report_sentences

from . import probe, retrieval_scores
from .data import PairDataset, log_skips, pair_table
from .pool import sample_pool

RECALL_KS = (1, 5, 10)
PRECISION_KS = (5, 10, 50)
TTA_MODES = ("flip",)


@dataclass
class SplitEmbeddings:
    records: list[ManifestItem]
    image_features: np.ndarray  # h_v / |h_v|
    image_projections: np.ndarray  # v / |v|


def load_split(manifest: Path, split: str | None, text_column: str = "text") -> list[ManifestItem]:
    records, skipped = read_manifest_items(manifest, split, text_column=text_column)
    log_skips(skipped, f"{manifest} [{split}]")
    if not records:
        raise ValueError(f"{manifest}: no images in split {split!r}")
    return records


def embed_images(
    records: Sequence[ManifestItem],
    embedder: Embedder,
    image_encoder: torch.nn.Module | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    tta: str | None = None,
) -> SplitEmbeddings:
    """Eval-view embeddings of every readable image (unreadable ones are dropped and logged),
    read through the image cache; `tta` as in embed_batch."""
    cache, side = ImageCache(cache_dir), embedder.bundle.config.resize
    resolver = Resolver(cache, side, progress=progress, desc="images")
    table, skipped = pair_table(resolver.resolve(records))
    log_skips(skipped, "eval images")
    dataset = PairDataset(table, cache.reader(side), embedder.bundle.config, train=False)
    cache.close()
    keys = [(0, i) for i in range(len(dataset))]
    batches = [keys[i : i + embedder.batch_size] for i in range(0, len(keys), embedder.batch_size)]
    loader = DataLoader(
        dataset, batch_sampler=batches, collate_fn=lambda b: torch.stack([x[0] for x in b])
    )
    features, projections = [], []
    for pixels in tqdm(loader, desc="embedding images", disable=not progress):
        h, v = embed_batch(pixels, embedder, image_encoder, tta)
        features.append(h)
        projections.append(v)
    kept = [records[i] for i in table.positions]
    return SplitEmbeddings(kept, np.concatenate(features), np.concatenate(projections))


def embed_batch(
    pixels: torch.Tensor,
    embedder: Embedder,
    image_encoder: torch.nn.Module | None = None,
    tta: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(h/|h|, v/|v|) of a batch of eval views. With tta="flip" each is the normalised mean over
    the image and its mirror image (flipped left-right): a view-averaged vector less tied to one
    crop's details, at the cost of left/right (a left lesion then embeds like a right one)."""
    if tta not in (None, *TTA_MODES):
        raise ValueError(f"unknown test-time augmentation {tta!r}: use one of {TTA_MODES}")
    views = [pixels] if tta is None else [pixels, torch.flip(pixels, dims=[-1])]
    embedded = [_embed_view(view, embedder, image_encoder) for view in views]
    if len(embedded) == 1:
        return embedded[0]
    return _mean_direction([h for h, _ in embedded]), _mean_direction([v for _, v in embedded])


def _embed_view(
    pixels: torch.Tensor, embedder: Embedder, image_encoder: torch.nn.Module | None
) -> tuple[np.ndarray, np.ndarray]:
    if image_encoder is None:
        return embedder.embed_pixels(pixels)
    # baseline: another (ImageNet) encoder's features; it has no projection head
    with torch.inference_mode():
        h = F.normalize(image_encoder(pixels.to(embedder.device)).float(), dim=-1)
    h = h.cpu().numpy()
    return h, h


def _mean_direction(vectors: list[np.ndarray]) -> np.ndarray:
    mean = np.mean(vectors, axis=0)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


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


def text_image_scores(
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
        out[f"text_to_image/recall@{k}"] = retrieval_scores.recall_at_k(t2i_scores, t2i_relevant, k)
        out[f"image_to_text/recall@{k}"] = retrieval_scores.recall_at_k(i2t_scores, i2t_relevant, k)
        out[f"random/text_to_image/recall@{k}"] = retrieval_scores.random_recall_at_k(
            t2i_relevant, k
        )
        out[f"random/image_to_text/recall@{k}"] = retrieval_scores.random_recall_at_k(
            i2t_relevant, k
        )
    return out


def image_image_scores(split: SplitEmbeddings, label_column: str) -> dict[str, float]:
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
        scores = retrieval_scores.exclude_self(vectors @ vectors.T)
        for k in PRECISION_KS:
            out[f"image_to_image/{space}/precision@{k}"] = retrieval_scores.precision_at_k(
                scores, same, k
            )
    # chance: the diagonal must not count as a candidate
    n = len(labelled)
    for k in PRECISION_KS:
        out[f"random/image_to_image/precision@{k}"] = float(same.sum(axis=1).mean() / max(1, n - 1))
    return out


def label_query_scores(
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
        out[f"label_text_to_image/precision@{k}"] = retrieval_scores.precision_at_k(
            scores, relevant, k
        )
        out[f"random/label_text_to_image/precision@{k}"] = retrieval_scores.random_precision_at_k(
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
    *,
    linear_probe: bool = False,
    fractions: Sequence[float] = probe.DEFAULT_FRACTIONS,
    probe_seeds: int = probe.DEFAULT_SEEDS,
    pool: int | None = None,
    min_words: int = 0,
    pool_seed: int = 0,
    tta: str | None = None,
) -> dict[str, float]:
    """Every score the inputs allow, as one flat dict (prefixed keys for baseline and chance).

    By default only images with a report take part (the pairs, as in DESIGN.md's reference table);
    `all_images` adds the image-only rows as queries and distractors (and, with `linear_probe`,
    as probe training and test rows). `pool`/`min_words` narrow the split's rows to a seeded
    sample (training/pool.py); `tta` applies to every image vector (embed_batch).
    """
    if linear_probe and not label_column:
        raise ValueError("the linear probe needs a label column")
    if linear_probe and split in (None, "train"):
        raise ValueError("the linear probe is fitted on split 'train': score another split")
    embedder = Embedder(bundle, device=device)
    embed = partial(
        embed_images, embedder=embedder, progress=progress, cache_dir=cache_dir, tta=tta
    )
    records, pool_info = pooled(
        scored_records(manifest, split, all_images), pool, min_words, pool_seed
    )
    split_embeddings = embed(records)
    result: dict[str, float] = {"n_images": len(split_embeddings.records), **pool_info}
    result |= text_image_scores(split_embeddings, embedder, text_mode)
    if not label_column:
        return result
    result |= image_image_scores(split_embeddings, label_column)
    if queries_csv:
        result |= label_query_scores(split_embeddings, embedder, queries_csv, label_column)
    encoder, base = None, None
    if baseline == "imagenet":
        encoder = initial_image_encoder(bundle.config).to(device).eval()
        base = embed(split_embeddings.records, image_encoder=encoder)
        for key, value in image_image_scores(base, label_column).items():
            if key.startswith("image_to_image/encoder/"):
                result[f"imagenet/{key}"] = value
    if linear_probe:
        train = scored_records(manifest, "train", all_images)
        result |= linear_probe_scores(
            embed, train, split_embeddings, base, encoder, label_column, fractions, probe_seeds
        )
    return result


def scored_records(manifest: Path, split: str | None, all_images: bool) -> list[ManifestItem]:
    """A split's rows that take part: the pairs, or with all_images every image (a split without
    any report keeps its images either way)."""
    records = load_split(manifest, split)
    return records if all_images else [r for r in records if r.text] or records


def pooled(
    records: list[ManifestItem], size: int | None, min_words: int, seed: int
) -> tuple[list[ManifestItem], dict[str, float]]:
    """The pool's rows and what the JSON says of it (nothing without a pool or a word minimum)."""
    if size is None and not min_words:
        return records, {}
    kept = sample_pool(records, size, min_words, seed)
    if not kept:
        raise ValueError(f"no pair has a caption of {min_words} words or more")
    info = {"pool_size": len(kept), "pool_min_words": min_words}
    if size is not None:
        info |= {"pool_requested": size, "pool_seed": seed}
    return kept, info


def linear_probe_scores(
    embed: Callable[..., SplitEmbeddings],
    train_records: Sequence[ManifestItem],
    test: SplitEmbeddings,
    base_test: SplitEmbeddings | None,
    encoder: torch.nn.Module | None,
    label_column: str,
    fractions: Sequence[float],
    seeds: int,
) -> dict[str, float]:
    """linear_probe/... keys for the model, imagenet/linear_probe/... for the baseline encoder
    (when given) and random/linear_probe/... for a probe that learns nothing from the images."""
    labelled_train = [r for r in train_records if r.meta.get(label_column)]
    if not labelled_train:
        raise ValueError(f"no train image has a value in label column {label_column!r}")
    train = embed(labelled_train)
    out = _probe(train, test, label_column, fractions, seeds)
    if encoder is not None and base_test is not None:
        base_train = embed(train.records, image_encoder=encoder)
        base = _probe(base_train, base_test, label_column, fractions, seeds)
        out |= {f"imagenet/{key}": value for key, value in base.items()}
    _, train_y = probe.labelled(train.image_features, train.records, label_column)
    _, test_y = probe.labelled(test.image_features, test.records, label_column)
    out["random/linear_probe/accuracy"] = probe.majority_accuracy(train_y, test_y)
    out["random/linear_probe/macro_auc"] = 0.5
    return out


def _probe(
    train: SplitEmbeddings,
    test: SplitEmbeddings,
    label_column: str,
    fractions: Sequence[float],
    seeds: int,
) -> dict[str, float]:
    train_x, train_y = probe.labelled(train.image_features, train.records, label_column)
    test_x, test_y = probe.labelled(test.image_features, test.records, label_column)
    return probe.linear_probe(train_x, train_y, test_x, test_y, fractions, seeds)


def format_table(result: dict[str, float]) -> str:
    """The scores as a text table: model | ImageNet baseline | chance. Counts stay in the JSON;
    a figure averaged over probe subsets shows its standard deviation beside it."""
    rows = [("metric", "model", "imagenet", "random")]
    for key, value in result.items():
        if not _in_table(key):
            continue
        rows.append(
            (
                key,
                _cell(value, result.get(f"{key}_std")),
                _cell(result.get(f"imagenet/{key}"), result.get(f"imagenet/{key}_std")),
                _cell(result.get(_chance_key(key))),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _in_table(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return (
        "/" in key
        and not key.startswith(("random/", "imagenet/"))
        and not name.startswith("n_")
        and not name.endswith("_std")
    )


def _chance_key(key: str) -> str:
    if key.startswith("linear_probe/"):  # chance does not depend on the fraction
        return "random/linear_probe/" + key.rsplit("/", 1)[-1]
    return "random/" + key.replace("/encoder/", "/").replace("/projection/", "/")


def _cell(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"
