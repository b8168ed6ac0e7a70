"""Linear-probe classification on frozen image features: the ConVIRT paper's label-efficiency
protocol (its Table 1), where a pretrained encoder earns its keep by how well a linear classifier
on its features does with 1%, 10% and 100% of the labels.

The classifier is a multinomial logistic regression (lbfgs, L2) on standardised features. Its
regularisation is fixed at C = 1.0 rather than tuned: tuning on dev would make dev a validation set
and the figures optimistic, and this split has no third part to tune on. Every encoder (the model,
the ImageNet baseline) gets the same classifier, so the comparison between them stays fair.

Fractions below 1 draw a class-stratified random subset of the labelled train rows, repeated over
`seeds` subsets (mean and standard deviation over them); the full set is fitted once (lbfgs is
deterministic, so repeats would add nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from convirt.manifest import ManifestItem

PROBE_C = 1.0  # inverse L2 strength, fixed (see the module docstring)
PROBE_MAX_ITER = 1000
DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
DEFAULT_SEEDS = 5
MIN_SUBSET = 2  # a classifier needs two rows of two classes, whatever the fraction says


def fraction_name(fraction: float) -> str:
    """The key segment for a fraction: 0.01 -> '1%', 1.0 -> '100%', 0.005 -> '0.5%'."""
    return f"{fraction * 100:g}%"


def subset_size(n: int, fraction: float) -> int:
    """Rows a fraction of n labelled rows gives: rounded, never under MIN_SUBSET (nor over n)."""
    return min(n, max(MIN_SUBSET, round(fraction * n)))


def subset_indices(labels: Sequence[str] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded, class-stratified random subset of subset_size rows.

    Classes get rows in proportion to their size, and at least one each when the subset has room
    for every class; a subset smaller than the number of classes takes one row from each of that
    many classes drawn at random, so it always holds at least two classes. Fraction 1: every row.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = class_quota(counts, subset_size(len(labels), fraction), rng)
    picked = [
        rng.choice(np.flatnonzero(inverse == c), q, replace=False) for c, q in enumerate(quota) if q
    ]
    return np.sort(np.concatenate(picked))


def class_quota(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows per class for a subset of n: largest-remainder proportional shares, each at least 1
    (when n >= the number of classes) and at most the class's size."""
    if n < len(counts):
        quota = np.zeros(len(counts), int)
        quota[rng.choice(len(counts), n, replace=False)] = 1
        return quota
    share = n * counts / counts.sum()
    quota = np.clip(np.floor(share).astype(int), 1, counts)
    while quota.sum() > n:  # the one-per-class floor overshot: take from the most over-served
        quota[np.argmax(np.where(quota > 1, quota - share, -np.inf))] -= 1
    while quota.sum() < n:  # hand the remainder to the most under-served classes with rows left
        quota[np.argmax(np.where(quota < counts, share - quota, -np.inf))] += 1
    return quota


def probe_model() -> Pipeline:
    """The classifier every encoder is probed with (module docstring: why C is fixed)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))


def class_probabilities(model: Pipeline, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """predict_proba with one column per class of `classes`: a class the model never saw (absent
    from its training subset) gets probability 0, so columns always mean the same class."""
    proba = np.zeros((len(x), len(classes)))
    proba[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(x)
    return proba


def macro_auc(test_y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over the classes that have both positives and negatives among the
    scored rows (a class absent from them has no defined AUC). NaN when none has."""
    aucs = [
        roc_auc_score(test_y == c, proba[:, j])
        for j, c in enumerate(classes)
        if 0 < np.count_nonzero(test_y == c) < len(test_y)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def fit_and_score(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: np.ndarray,
) -> dict[str, float]:
    """Accuracy (a test label never seen in training counts as an error) and macro AUC of one fit;
    AUC over `classes`, the labels of the whole train set."""
    model = probe_model().fit(train_x, train_y)
    proba = class_probabilities(model, test_x, classes)
    return {
        "accuracy": float(np.mean(model.predict(test_x) == test_y)),
        "macro_auc": macro_auc(test_y, proba, classes),
    }


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence[str] | np.ndarray,
    test_x: np.ndarray,
    test_y: Sequence[str] | np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: int = DEFAULT_SEEDS,
) -> dict[str, float]:
    """Probe figures per fraction as flat keys: linear_probe/{1%,...}/{accuracy,macro_auc} (means
    over `seeds` subsets below 100%, with .._std beside them) and /n_train (subset size), plus
    linear_probe/n_train, n_test and n_classes."""
    if seeds < 1:
        raise ValueError(f"the linear probe needs at least 1 seed, got {seeds}")
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError(f"the linear probe needs 2 classes among the train labels, got {classes}")
    if not len(test_y):
        raise ValueError("the linear probe has no labelled image to score")
    out: dict[str, float] = {
        "linear_probe/n_train": len(train_y),
        "linear_probe/n_test": len(test_y),
        "linear_probe/n_classes": len(classes),
    }
    for fraction in fractions:
        runs = []
        for seed in range(seeds) if fraction < 1 else [0]:
            rows = subset_indices(train_y, fraction, seed)
            runs.append(fit_and_score(train_x[rows], train_y[rows], test_x, test_y, classes))
        prefix = f"linear_probe/{fraction_name(fraction)}"
        out[f"{prefix}/n_train"] = len(rows)
        for score in ("accuracy", "macro_auc"):
            values = [run[score] for run in runs]
            out[f"{prefix}/{score}"] = float(np.mean(values))
            if fraction < 1:
                out[f"{prefix}/{score}_std"] = float(np.std(values))
    return out


def majority_accuracy(
    train_y: Sequence[str] | np.ndarray, test_y: Sequence[str] | np.ndarray
) -> float:
    """Accuracy of always answering the most frequent train label: what a probe learning nothing
    from the images scores (its AUC would be 0.5)."""
    labels, counts = np.unique(np.asarray(train_y), return_counts=True)
    return float(np.mean(np.asarray(test_y) == labels[np.argmax(counts)]))


def labelled(
    features: np.ndarray, records: Sequence[ManifestItem], label_column: str
) -> tuple[np.ndarray, np.ndarray]:
    """The feature rows of the records with a value in label_column, and those values."""
    labels = np.array([r.meta.get(label_column, "") for r in records], dtype=str)
    keep = labels != ""
    return features[keep], labels[keep]
