"""Locked towers' feature caches (issue 22): computed once per input, shared across runs, never
stale: a changed tower or input has another key. Stage 1 resumes bit-for-bit."""

import torch
from conftest import small_train_config

from convirt.bundle import load_tokenizer
from convirt.encoders import build_image_encoder, build_text_encoder
from convirt.imagecache import ImageCache
from training.config import HeadsStage
from training.data import PairDataset, load_pairs
from training.features import FeatureStore, image_features, image_views, pixels_key, text_features
from training.heads import train_heads
from training.run import build_datasets
from training.run_identity import run_identity

SENTENCES = ["The heart is enlarged.", "No pleural effusion.", "A lytic lesion of the femur."]


def test_text_cache_hits_and_is_invalidated_by_a_changed_tower_or_input(
    small_model_config, tmp_path
):
    encoder, tokenizer = build_text_encoder(small_model_config), load_tokenizer(small_model_config)
    first, store = text_features(encoder, tokenizer, 32, SENTENCES, tmp_path)
    assert store.computed == 3 and first.shape == (3, encoder.out_dim)
    again, store = text_features(encoder, tokenizer, 32, SENTENCES, tmp_path)  # another run
    assert store.computed == 0 and (again == first).all()
    changed_input = [*SENTENCES[:2], "A lytic lesion of the tibia."]
    vectors, store = text_features(encoder, tokenizer, 32, changed_input, tmp_path)
    assert store.computed == 1 and (vectors[:2] == first[:2]).all()
    assert not (vectors[2] == first[2]).all()
    with torch.no_grad():
        encoder.bert.encoder.layer[-1].output.dense.bias.add_(0.01)  # the tower changed
    changed_tower, store = text_features(encoder, tokenizer, 32, SENTENCES, tmp_path)
    assert store.computed == 3 and not (changed_tower == first).all()
    assert len({p.name for p in tmp_path.iterdir()}) == 2  # one folder per tower fingerprint
    # what the cache holds is what the tower gives at serve time
    tokens = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = encoder(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(torch.from_numpy(changed_tower), direct, atol=1e-5, rtol=1e-5)


def test_image_views_are_cached_once_and_view_zero_is_the_eval_view(
    medpix_subset, small_model_config, tmp_path
):
    cache = ImageCache()
    table, _ = load_pairs([medpix_subset], "dev", cache, small_model_config.resize)
    dataset = PairDataset(table, cache.reader(small_model_config.resize), small_model_config, False)
    encoder = build_image_encoder(small_model_config)
    features, store = image_features(encoder, dataset, 3, tmp_path)
    distinct = len({pixels_key(dataset.reader.read(table.entry(i))) for i in range(len(table))})
    assert features.shape == (12, 3, 1280) and store.computed == 3 * distinct
    again, store = image_features(encoder, dataset, 3, tmp_path)
    assert store.computed == 0 and (again == features).all()
    assert FeatureStore(tmp_path, store.folder.name).vectors.keys() == store.vectors.keys()
    encoder.eval()
    with torch.no_grad():
        eval_view = encoder(dataset[(0, 0)][0][None])[0]  # the eval transform, as serving embeds
        views = image_views(dataset.image_tensor(0), small_model_config, "k", 3)
    torch.testing.assert_close(torch.from_numpy(features[0, 0]), eval_view, atol=1e-4, rtol=1e-4)
    assert torch.equal(views[1], torch.flip(views[0], dims=[-1]))
    assert not torch.equal(views[2], views[0])  # an augmented draw
    # a changed input: other pixels, another key
    other = dataset.reader.read(table.entry(0)).copy()
    other[0, 0] ^= 1
    assert pixels_key(other) != pixels_key(dataset.reader.read(table.entry(0)))


def test_stage1_resumes_bit_identically(medpix_subset, small_model_config, tmp_path):
    config = small_train_config(small_model_config, num_workers=0, false_negatives="mask")
    stage = HeadsStage(epochs=2, lr=1e-3, image_views=2)
    train_set, dev = build_datasets(config, [medpix_subset], progress=False)
    identity = run_identity(config, [])
    train_heads(config, stage, train_set, dev, tmp_path / "straight", identity)
    train_heads(config, stage, train_set, dev, tmp_path / "split", identity, max_steps=4)
    stopped = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert stopped["state"]["step"] == 4 and stopped["state"]["epoch"] == 0
    train_heads(config, stage, train_set, dev, tmp_path / "split", identity)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert straight["state"]["step"] == resumed["state"]["step"] == 12
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert (tmp_path / "split" / "bundle" / "bundle.json").is_file()
