import json

import numpy as np
import pytest
from PIL import Image

from convirt.bundle import BundleError, load_bundle, load_tokenizer, read_bundle_info, save_bundle
from convirt.inference import Embedder
from convirt.model import build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_model_config):
    model = build_model(small_model_config, seed=0).eval()
    tokenizer = load_tokenizer(small_model_config)
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    fingerprint = save_bundle(model, tokenizer, path, {"note": "test"})
    return model, tokenizer, path, fingerprint


def test_bundle_round_trips_to_identical_embeddings(saved, datasets):
    model, tokenizer, path, fingerprint = saved
    loaded = load_bundle(path)
    assert loaded.fingerprint == fingerprint and loaded.provenance["note"] == "test"
    from convirt.bundle import Bundle

    original = Embedder(Bundle(model, tokenizer, model.config, fingerprint))
    reloaded = Embedder(loaded)
    texts = ["No acute cardiopulmonary abnormality.", "Bilateral ground-glass opacities."]
    assert np.array_equal(original.embed_texts(texts).vectors, reloaded.embed_texts(texts).vectors)
    images = [Image.open(p) for p in sorted((datasets / "medpix" / "images").glob("*.jpg"))[:3]]
    for a, b in zip(original.embed_images(images), reloaded.embed_images(images), strict=True):
        assert np.array_equal(a, b)


def test_bundle_loads_without_the_original_text_folder(saved, monkeypatch):
    _, _, path, fingerprint = saved
    import convirt.paths

    def nowhere():
        raise AssertionError("loading a bundle must not touch the packaged weights")

    monkeypatch.setattr(convirt.paths, "packaged_text_encoder", nowhere)
    monkeypatch.setattr(convirt.paths, "packaged_efficientnet_lite0", nowhere)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_bundle(path).fingerprint == fingerprint


def test_fingerprint_changes_with_weights(saved, tmp_path, small_model_config):
    _, tokenizer, _, fingerprint = saved
    other = build_model(small_model_config, seed=1)
    assert save_bundle(other, tokenizer, tmp_path / "b") != fingerprint


def test_corrupt_and_missing_bundles_are_clear_errors(saved, tmp_path):
    _, _, path, _ = saved
    with pytest.raises(BundleError, match="not a model bundle"):
        read_bundle_info(tmp_path)
    manifest = json.loads((path / "bundle.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bundle.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 16}))
    (broken / "weights.safetensors").write_bytes((path / "weights.safetensors").read_bytes())
    with pytest.raises(BundleError, match="does not match the recorded"):
        load_bundle(broken)
    (broken / "bundle.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(broken)


def test_text_truncation_is_reported(saved):
    model, tokenizer, _, fingerprint = saved
    from convirt.bundle import Bundle

    embedder = Embedder(Bundle(model, tokenizer, model.config, fingerprint))
    result = embedder.embed_texts(["short text", "word " * 500])
    assert result.truncated == [False, True]
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0)


def test_texts_of_mixed_lengths_embed_as_if_one_at_a_time(saved):
    model, tokenizer, _, fingerprint = saved
    from convirt.bundle import Bundle

    embedder = Embedder(Bundle(model, tokenizer, model.config, fingerprint), batch_size=4)
    texts = [f"finding {n}: " + "small effusion " * (n % 7) for n in range(11)]
    together = embedder.embed_texts(texts).vectors
    alone = np.concatenate([embedder.embed_texts([text]).vectors for text in texts])
    assert np.allclose(together, alone, atol=1e-5)


def test_length_chunks_sort_and_bound_padding():
    from convirt.inference import length_chunks

    lengths = [30, 5, 12, 5, 40, 7, 12, 64]
    chunks = length_chunks(lengths, max_batch=3, max_tokens=40)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    order = [lengths[i] for chunk in chunks for i in chunk]
    assert order == sorted(lengths)
    for chunk in chunks:
        assert len(chunk) <= 3
        assert len(chunk) == 1 or len(chunk) * max(lengths[i] for i in chunk) <= 40
    assert length_chunks([100], 32, 10) == [[0]]  # one long text still gets its own chunk
