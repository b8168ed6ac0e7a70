"""ConVIRT: two encoders, two projection heads, one joint space."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .encoders import ImageEncoder, TextEncoder, build_image_encoder, build_text_encoder


class ProjectionHead(nn.Module):
    """g(h) = W2 ReLU(W1 h): a single hidden layer, one head per modality."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ConVIRT(nn.Module):
    def __init__(self, config: ModelConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        dims = (config.projection_hidden_dim, config.projection_dim)
        self.image_head = ProjectionHead(image_encoder.out_dim, *dims)
        self.text_head = ProjectionHead(text_encoder.out_dim, *dims)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_v, v): encoder features and their projection into the joint space (unnormalised)."""
        h = self.image_encoder(pixels)
        return h, self.image_head(h)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_u, u): pooled BERT features and their projection (unnormalised)."""
        h = self.text_encoder(input_ids, attention_mask)
        return h, self.text_head(h)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels)[1], self.encode_text(input_ids, attention_mask)[1]


def build_model(config: ModelConfig, seed: int | None = None) -> ConVIRT:
    """A fresh model: pretrained encoders as configured, randomly initialised heads."""
    if seed is not None:
        torch.manual_seed(seed)
    return ConVIRT(config, build_image_encoder(config), build_text_encoder(config))
