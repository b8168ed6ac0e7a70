import re

import pytest
import torch

from convirt.config import ModelConfig
from convirt.encoders import build_image_encoder, masked_max_pool
from convirt.model import build_model
from convirt.paths import MissingWeightsError


def test_masked_max_pool_ignores_padding():
    tokens = torch.tensor([[[1.0, -5.0], [2.0, -3.0], [100.0, 100.0]]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert masked_max_pool(tokens, mask).tolist() == [[2.0, -3.0]]


def test_masked_max_pool_negative_values_beat_padding():
    # all real values negative: a zero-filled pad must still not win
    tokens = torch.tensor([[[-1.0], [-2.0], [0.0]]])
    assert masked_max_pool(tokens, torch.tensor([[1, 1, 0]])).item() == -1.0


@pytest.fixture(scope="module")
def model(small_model_config):
    return build_model(small_model_config, seed=0)


def test_frozen_text_layers_receive_no_gradient(model, small_model_config):
    bert = model.text_encoder.bert
    n_layers = len(bert.encoder.layer)
    frozen = n_layers // 2
    model.train()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    _, u = model.encode_text(ids, torch.ones_like(ids))
    pixels = torch.randn(2, 3, 64, 64)
    _, v = model.encode_image(pixels)
    (u.sum() + v.sum()).backward()
    for name, p in bert.embeddings.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for i, layer in enumerate(bert.encoder.layer):
        grads = [p.grad for p in layer.parameters()]
        if i < frozen:
            assert all(g is None for g in grads), f"layer {i} is frozen but got a gradient"
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"layer {i} untrained"
    assert model.image_head.net[0].weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_projection_dims_and_grey_inputs(model):
    model.eval()
    with torch.no_grad():
        h, v = model.encode_image(torch.randn(3, 3, 64, 64))
    assert h.shape == (3, 1280) and v.shape == (3, 512)


def test_resnet50_random_init_and_missing_weights(tmp_path):
    encoder = build_image_encoder(ModelConfig(image_encoder="resnet50", image_weights="none"))
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    with pytest.raises(MissingWeightsError, match="no packaged weights"):
        build_image_encoder(ModelConfig(image_encoder="resnet50"))
    with pytest.raises(MissingWeightsError, match=re.escape(str(tmp_path / "r50.pth"))):
        build_image_encoder(
            ModelConfig(image_encoder="resnet50", image_weights=str(tmp_path / "r50.pth"))
        )


def test_resnet50_loads_state_dict_by_path(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(3)
    reference = resnet50(weights=None)
    path = tmp_path / "r50.pth"
    torch.save(reference.state_dict(), path)
    encoder = build_image_encoder(ModelConfig(image_encoder="resnet50", image_weights=str(path)))
    assert torch.equal(encoder.trunk[0].weight, reference.conv1.weight)


def test_text_encoder_by_path_with_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"config\.json missing"):
        build_model(ModelConfig(text_encoder=str(tmp_path)))
