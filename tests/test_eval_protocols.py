"""Evaluation protocols beside the plain split: the seeded retrieval pool (ROCO-2k style,
training/pool.py) and flip test-time augmentation, on real ROCO captions and real images."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import read_rows, write_manifest

from convirt.bundle import initial_image_encoder, load_bundle
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.manifest import read_manifest_items
from training import evaluate as evaluate_module
from training.cli import eval_main
from training.evaluate import embed_batch, embed_images, evaluate
from training.pool import caption_words, sample_pool


@pytest.fixture(scope="module")
def roco_items(datasets):
    items, _ = read_manifest_items(datasets / "roco" / "manifest.csv")
    return items


@pytest.fixture(scope="module")
def roco_subset(datasets, tmp_path_factory):
    """The first 40 ROCO dev pairs (36 of them with captions of 8 words or more)."""
    rows = [r for r in read_rows(datasets / "roco" / "manifest.csv") if r["split"] == "dev"][:40]
    folder = tmp_path_factory.mktemp("roco")
    return write_manifest(folder / "manifest.csv", rows, datasets / "roco")


def ids(items):
    return [item.relpath for item in items]


def test_min_words_keeps_exactly_the_long_enough_captions(roco_items):
    threshold = 12
    kept = sample_pool(roco_items, None, min_words=threshold)
    assert kept == [i for i in roco_items if len(i.text.split()) >= threshold]
    counts = [caption_words(i.text) for i in roco_items]
    assert threshold in counts and threshold - 1 in counts  # the boundary is exercised
    kept_ids = set(ids(kept))
    for item, count in zip(roco_items, counts, strict=True):
        assert (item.relpath in kept_ids) == (count >= threshold)
    assert caption_words("  two\twords\n") == 2


def test_pool_size_determinism_and_seeds(roco_items):
    pool = sample_pool(roco_items, 200, min_words=5, seed=7)
    assert len(pool) == len(set(ids(pool))) == 200
    assert all(caption_words(i.text) >= 5 for i in pool)
    assert ids(pool) == ids(sample_pool(roco_items, 200, min_words=5, seed=7))
    shuffled = list(roco_items)
    random.Random(0).shuffle(shuffled)
    assert set(ids(sample_pool(shuffled, 200, min_words=5, seed=7))) == set(ids(pool))
    other = sample_pool(roco_items, 200, min_words=5, seed=8)
    assert len(set(ids(other)) & set(ids(pool))) < 150  # another draw, not the same pairs
    # a smaller pool of the same seed is part of the larger one; input order is kept
    assert set(ids(sample_pool(roco_items, 50, 5, 7))) <= set(ids(pool))
    positions = {relpath: n for n, relpath in enumerate(ids(roco_items))}
    assert [positions[p] for p in ids(pool)] == sorted(positions[p] for p in ids(pool))


def test_a_pool_larger_than_the_eligible_pairs_is_all_of_them(roco_items):
    eligible = sample_pool(roco_items, None, min_words=40)
    assert 0 < len(eligible) < 2000
    assert sample_pool(roco_items, 2000, min_words=40, seed=3) == eligible
    with pytest.raises(ValueError):
        sample_pool(roco_items, 0)
    with pytest.raises(ValueError):
        sample_pool(roco_items, 10, min_words=-1)


def test_evaluate_scores_the_pool(roco_subset, bundle_dir, monkeypatch):
    items, _ = read_manifest_items(roco_subset, "dev")
    expected = sample_pool(items, 10, min_words=8, seed=1)
    embedded = []
    original = evaluate_module.embed_images

    def recording(records, **kwargs):
        embedded.append(ids(records))
        return original(records, **kwargs)

    monkeypatch.setattr(evaluate_module, "embed_images", recording)
    result = evaluate(
        load_bundle(bundle_dir), roco_subset, "dev", pool=10, min_words=8, pool_seed=1,
        progress=False,
    )  # fmt: skip
    assert embedded == [ids(expected)]
    assert result["n_images"] == result["pool_size"] == result["pool_requested"] == 10
    assert result["pool_min_words"] == 8 and result["pool_seed"] == 1
    assert result["n_images_with_report"] == 10 and 0 <= result["text_to_image/recall@1"] <= 1


def test_eval_cli_warns_when_the_pool_is_short(roco_subset, bundle_dir, capsys):
    code = eval_main(
        ["--model", str(bundle_dir), "--manifest", str(roco_subset), "--pool", "1000",
         "--min-words", "8", "--no-progress"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["pool_requested"] == 1000 and result["pool_size"] == result["n_images"] == 36
    assert "warning: the pool has 36 pairs, fewer than the 1000 requested" in captured.err


@pytest.fixture(scope="module")
def embedder(bundle_dir):
    return Embedder(load_bundle(bundle_dir))


@pytest.fixture(scope="module")
def medpix_pixels(datasets, embedder):
    """Eval views of 6 real medpix dev images."""
    items, _ = read_manifest_items(datasets / "medpix" / "manifest.csv", "dev")
    return items[:6], torch.stack([embedder.preprocess(load_image(i.path)) for i in items[:6]])


@pytest.mark.parametrize("baseline", [False, True])
def test_flip_tta_embeds_an_image_and_its_mirror_alike(embedder, medpix_pixels, baseline):
    _, pixels = medpix_pixels
    encoder = initial_image_encoder(embedder.bundle.config).eval() if baseline else None
    mirrored = torch.flip(pixels, dims=[-1])
    plain, plain_mirror = (
        embed_batch(pixels, embedder, encoder),
        embed_batch(mirrored, embedder, encoder),
    )
    tta, tta_mirror = (embed_batch(p, embedder, encoder, "flip") for p in (pixels, mirrored))
    for space in (0, 1):  # h_v, v
        assert np.abs(plain[space] - plain_mirror[space]).max() > 1e-3  # a CNN is not symmetric
        np.testing.assert_allclose(tta[space], tta_mirror[space], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(tta[space], axis=1), 1.0, atol=1e-5)
        mean = plain[space] + plain_mirror[space]
        expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        np.testing.assert_allclose(tta[space], expected, atol=1e-6)
    with pytest.raises(ValueError):
        embed_batch(pixels, embedder, encoder, "rotate")


def test_evaluate_applies_tta_to_every_image_vector(medpix_subset, bundle_dir, monkeypatch):
    seen = []
    original = evaluate_module.embed_batch

    def recording(pixels, embedder, image_encoder=None, tta=None):
        seen.append((image_encoder is None, tta))
        return original(pixels, embedder, image_encoder, tta)

    monkeypatch.setattr(evaluate_module, "embed_batch", recording)
    result = evaluate(
        load_bundle(bundle_dir), medpix_subset, "dev", label_column="location_category",
        baseline="imagenet", tta="flip", progress=False,
    )  # fmt: skip
    assert {tta for _, tta in seen} == {"flip"} and {model for model, _ in seen} == {True, False}
    assert 0 <= result["image_to_image/encoder/precision@5"] <= 1


def test_embed_images_with_tta_matches_the_batch_function(embedder, medpix_pixels):
    """The cached eval view (embed_images) and the uploaded-image path agree under TTA too."""
    items, pixels = medpix_pixels
    through_cache = embed_images(items, embedder, progress=False, tta="flip")
    h, v = embed_batch(pixels, embedder, tta="flip")
    np.testing.assert_allclose(through_cache.image_features, h, atol=1e-4)
    np.testing.assert_allclose(through_cache.image_projections, v, atol=1e-4)
