"""The linear probe (training/probe.py) on real image features: medpix images embedded by the
untrained bundle (ImageNet encoder), with labels whose learnability is known."""

import json

import numpy as np
import pytest

from convirt.bundle import load_bundle
from convirt.inference import Embedder
from convirt.manifest import read_manifest_items
from training import probe
from training.cli import eval_main
from training.evaluate import embed_images, format_table

LABEL = "location_category"


@pytest.fixture(scope="module")
def features(datasets, bundle_dir):
    """h_v of 166 medpix train and 99 dev images, with their real body-region labels."""
    embedder = Embedder(load_bundle(bundle_dir))
    manifest = datasets / "medpix" / "manifest.csv"
    out = {}
    for split, step in (("train", 10), ("dev", 2)):
        items, _ = read_manifest_items(manifest, split)
        embedded = embed_images(items[::step], embedder, progress=False)
        out[split] = probe.labelled(embedded.image_features, embedded.records, LABEL)
    return out


def test_probe_learns_a_linear_rule_of_real_features(features):
    """Labels = the side of the train features' first principal axis, the middle 20% left out
    (a margin): a linear probe must recover them on held-out images."""
    (train_x, _), (test_x, _) = features["train"], features["dev"]
    mean = train_x.mean(axis=0)
    axis = np.linalg.svd(train_x - mean, full_matrices=False)[2][0]
    low, middle, high = np.quantile((train_x - mean) @ axis, [0.4, 0.5, 0.6])

    def separable(x):
        side = (x - mean) @ axis
        keep = (side < low) | (side > high)
        return x[keep], np.where(side[keep] > middle, "high", "low")

    (train_x, train_y), (test_x, test_y) = separable(train_x), separable(test_x)
    result = probe.linear_probe(train_x, train_y, test_x, test_y, fractions=(1.0,))
    majority = probe.majority_accuracy(train_y, test_y)
    assert result["linear_probe/100%/accuracy"] > max(0.9, majority + 0.2), (result, majority)
    assert result["linear_probe/100%/macro_auc"] > 0.95, result


def test_real_labels_beat_the_majority_class(features):
    """ImageNet features tell a head from an abdomen: the probe must do better than chance."""
    (train_x, train_y), (test_x, test_y) = features["train"], features["dev"]
    result = probe.linear_probe(train_x, train_y, test_x, test_y, fractions=(1.0,))
    assert result["linear_probe/100%/accuracy"] > probe.majority_accuracy(train_y, test_y) + 0.1
    assert result["linear_probe/100%/macro_auc"] > 0.7, result


@pytest.mark.parametrize("seed", [0, 1])
def test_shuffled_labels_score_chance(features, seed):
    """Labels permuted over the images carry nothing the features could learn: accuracy no
    better than always answering the majority class, AUC about 0.5."""
    (train_x, train_y), (test_x, test_y) = features["train"], features["dev"]
    rng = np.random.default_rng(seed)
    train_y, test_y = rng.permutation(train_y), rng.permutation(test_y)
    result = probe.linear_probe(train_x, train_y, test_x, test_y, (0.1, 1.0), seeds=3)
    majority = probe.majority_accuracy(train_y, test_y)
    for fraction in ("10%", "100%"):
        assert result[f"linear_probe/{fraction}/accuracy"] < majority + 0.1, (result, majority)
        assert abs(result[f"linear_probe/{fraction}/macro_auc"] - 0.5) < 0.1, result


def test_subsets_are_seeded_stratified_and_sized(datasets):
    items, _ = read_manifest_items(datasets / "medpix" / "manifest.csv", "train")
    labels = np.array([item.meta[LABEL] for item in items])
    classes, counts = np.unique(labels, return_counts=True)
    for fraction in (0.01, 0.1, 0.5):
        rows = probe.subset_indices(labels, fraction, seed=3)
        assert len(rows) == len(set(rows)) == round(fraction * len(labels))
        np.testing.assert_array_equal(rows, probe.subset_indices(labels, fraction, seed=3))
        assert not np.array_equal(rows, probe.subset_indices(labels, fraction, seed=4))
        picked = dict(zip(*np.unique(labels[rows], return_counts=True), strict=True))
        for label, count in zip(classes, counts, strict=True):
            assert picked.get(label, 0) >= 1
            assert abs(picked.get(label, 0) - fraction * count) <= 1.5, (label, picked)
    tiny = probe.subset_indices(labels, 0.0005, seed=0)  # rounds to 1 row: 2 are kept, 2 classes
    assert len(tiny) == 2 and len(set(labels[tiny])) == 2
    np.testing.assert_array_equal(probe.subset_indices(labels, 1.0, 0), np.arange(len(labels)))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            probe.subset_indices(labels, bad, 0)


def test_probe_is_reproducible_and_reports_subset_sizes(features):
    (train_x, train_y), (test_x, test_y) = features["train"], features["dev"]
    args = (train_x, train_y, test_x, test_y, (0.05, 1.0))
    first, again = probe.linear_probe(*args, seeds=3), probe.linear_probe(*args, seeds=3)
    assert first == again
    assert first["linear_probe/5%/n_train"] == probe.subset_size(len(train_y), 0.05) == 8
    assert first["linear_probe/100%/n_train"] == first["linear_probe/n_train"] == len(train_y)
    assert first["linear_probe/n_classes"] == 5 and first["linear_probe/n_test"] == len(test_y)
    assert first["linear_probe/5%/accuracy_std"] > 0  # three different subsets
    assert "linear_probe/100%/accuracy_std" not in first  # fitted once
    other = probe.linear_probe(*args, seeds=4)
    assert other["linear_probe/5%/accuracy"] != first["linear_probe/5%/accuracy"]


def test_probabilities_keep_a_column_for_classes_missing_from_the_subset(features):
    (train_x, train_y), (test_x, test_y) = features["train"], features["dev"]
    classes = np.unique(train_y)
    seen = train_y != classes[1]
    model = probe.probe_model().fit(train_x[seen], train_y[seen])
    proba = probe.class_probabilities(model, test_x, classes)
    assert proba.shape == (len(test_x), len(classes))
    np.testing.assert_array_equal(proba[:, 1], 0.0)
    np.testing.assert_allclose(np.delete(proba, 1, axis=1), model.predict_proba(test_x))
    # the unseen class is in dev: its constant column scores an AUC of exactly 0.5
    only_unseen = probe.macro_auc(np.where(test_y == classes[1], classes[1], "x"), proba, classes)
    assert only_unseen == 0.5


def test_eval_cli_linear_probe(medpix_subset, bundle_dir, capsys):
    """24 train / 12 dev medpix pairs; train's majority class (Head) is absent from dev."""
    code = eval_main(
        ["--model", str(bundle_dir), "--manifest", str(medpix_subset), "--label-column", LABEL,
         "--linear-probe", "--baseline", "imagenet", "--fractions", "0.25,1", "--probe-seeds", "2",
         "--no-progress"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["linear_probe/n_train"] == 24 and result["linear_probe/n_test"] == 12
    assert result["linear_probe/25%/n_train"] == 6 and result["linear_probe/n_classes"] == 5
    for prefix in ("", "imagenet/"):
        for key in ("25%/accuracy", "25%/accuracy_std", "25%/macro_auc", "100%/macro_auc"):
            assert 0.0 <= result[f"{prefix}linear_probe/{key}"] <= 1.0, prefix + key
    assert result["random/linear_probe/accuracy"] == 0.0
    table = format_table(result)
    row = next(line for line in table.splitlines() if line.startswith("linear_probe/25%/accuracy"))
    assert row.count("±") == 2 and row.split()[-1] == "0.000"  # model, imagenet; chance
    assert "n_train" not in table and "_std" not in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [([], "needs --label-column"), (["--label-column", LABEL, "--split", "train"], "fitted on")],
)
def test_eval_cli_refuses_a_probe_it_cannot_run(medpix_subset, bundle_dir, capsys, extra, message):
    argv = ["--model", str(bundle_dir), "--manifest", str(medpix_subset), "--linear-probe"]
    assert eval_main(argv + extra) == 2
    assert message in capsys.readouterr().err
