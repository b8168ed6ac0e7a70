"""The two encoders: a CNN f_v for images and a BERT f_u with masked max-pooling for text."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import mpnet, paths
from .config import ModelConfig
from .paths import MissingWeightsError


class ImageEncoder(nn.Module):
    """A CNN trunk with global average pooling: 3xSxS images in, h_v of `out_dim` features out."""

    def __init__(self, trunk: nn.Module, out_dim: int):
        super().__init__()
        self.trunk = trunk
        self.out_dim = out_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.trunk(pixels)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)


class _LiteTrunk(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def build_image_encoder(config: ModelConfig, pretrained: bool = True) -> ImageEncoder:
    """The configured CNN; with `pretrained`, loads image_weights (packaged, none, or a path)."""
    weights = _image_weights_path(config) if pretrained else None
    if config.image_encoder.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects dynamic "same" padding, so any input size works.
        net = EfficientNet.from_name(config.image_encoder, image_size=None)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        del net._fc, net._dropout  # classifier unused: h_v is the pooled trunk output
        return ImageEncoder(_LiteTrunk(net), out_dim=1280)
    if config.image_encoder == "resnet50":
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            state = {k.removeprefix("module."): v for k, v in state.items()}
            net.load_state_dict(state, strict=False)
        trunk = nn.Sequential(*list(net.children())[:-2])  # up to the last conv stage
        return ImageEncoder(trunk, out_dim=2048)
    raise ValueError(f"unknown image encoder {config.image_encoder!r}")


def _image_weights_path(config: ModelConfig) -> Path | None:
    choice = config.image_weights
    if choice == "none":
        return None
    if choice == "packaged":
        path = _packaged_image_weights(config.image_encoder)
    else:
        path = Path(choice).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"image encoder weights not found at {path}: supply that file or set image_weights"
        )
    return path


def _packaged_image_weights(name: str) -> Path:
    # Looked up on the module at call time, so tests can stand in for a missing package.
    if name == "efficientnet-lite0":
        return paths.packaged_efficientnet_lite0()
    if name == "efficientnet-lite2":
        return paths.packaged_efficientnet_lite2()
    raise MissingWeightsError(
        f"no packaged weights exist for {name}: set image_weights to a state-dict path "
        "(e.g. torchvision's resnet50 .pth) or to 'none' for random init"
    )


def text_encoder_path(config: ModelConfig) -> Path:
    """The transformers folder of model.text_encoder: a packaged encoder by name, else a path."""
    name = config.text_encoder
    if name in ("packaged", "minilm"):
        path = paths.packaged_text_encoder()
    elif name == "mpnet":
        path = mpnet.mpnet_text_encoder()
    else:
        path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise MissingWeightsError(
            f"no transformers model folder at {path} (config.json missing): point text_encoder "
            "at a BERT folder such as a local ClinicalBERT download"
        )
    return path


class TextEncoder(nn.Module):
    """BERT token outputs, max-pooled over real tokens only (padding never wins the max)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        self.out_dim = bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_max_pool(tokens, attention_mask)


def masked_max_pool(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Max over the sequence axis of B x T x D, ignoring positions where the mask is 0."""
    padding = ~attention_mask.bool().unsqueeze(-1)
    return tokens.masked_fill(padding, torch.finfo(tokens.dtype).min).amax(dim=1)


def build_text_encoder(config: ModelConfig, bert_config_dir: Path | None = None) -> TextEncoder:
    """Load the BERT folder with its weights, or (bundle loading) only its architecture."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if bert_config_dir is not None:
        bert = AutoModel.from_config(AutoConfig.from_pretrained(bert_config_dir))
    else:
        bert = AutoModel.from_pretrained(text_encoder_path(config))
    if hasattr(bert, "pooler"):
        bert.pooler = None  # unused by max-pooling; keeps the bundle free of dead weights
    freeze_lower_layers(bert, config)
    return TextEncoder(bert)


def freeze_lower_layers(bert: nn.Module, config: ModelConfig) -> None:
    """Freeze the embeddings and the lowest layers (paper: ClinicalBERT's first 6 of 12)."""
    layers = bert.encoder.layer
    count = len(layers) // 2 if config.text_frozen_layers == "half" else config.text_frozen_layers
    if not 0 <= count <= len(layers):
        raise ValueError(
            f"text_frozen_layers={count} but the text encoder has {len(layers)} layers"
        )
    frozen = [layers[i] for i in range(count)]
    if config.freeze_text_embeddings:
        frozen.append(bert.embeddings)
        # MPNet keeps its relative position bias beside the layers, shared by all of them: it is
        # position information, as BERT's position embeddings are, and the frozen layers use it.
        shared_bias = getattr(bert.encoder, "relative_attention_bias", None)
        if shared_bias is not None:
            frozen.append(shared_bias)
    for module in frozen:
        module.requires_grad_(False)
