"""Image transforms: ConVIRT's training augmentation t_v and the deterministic eval view.

Images stay single-channel uint8 through the augmentations (three times cheaper than RGB on the
2-core machine) and become 3 normalised channels only at the end, as the ImageNet backbones expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .config import ModelConfig


@dataclass(frozen=True)
class AugmentationSettings:
    """The paper's t_v ranges (DESIGN.md); tests check the transform honours them."""

    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip_p: float = 0.5
    rotation_degrees: float = 20.0
    translate: float = 0.1
    affine_scale: tuple[float, float] = (0.95, 1.05)
    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    blur_sigma: tuple[float, float] = (0.1, 3.0)


PAPER_AUGMENTATION = AugmentationSettings()


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A greyscale PIL image as a 1xHxW uint8 tensor."""
    return torch.from_numpy(np.array(image.convert("L"), dtype=np.uint8, copy=True))[None]


def _blur_kernel(max_sigma: float) -> int:
    k = int(2 * round(3 * max_sigma) + 1)
    return k


def train_transform(config: ModelConfig, aug: AugmentationSettings = PAPER_AUGMENTATION):
    """t_v: crop, flip, affine, brightness/contrast, blur; uint8 1xHxW in, float 3xSxS out."""
    mean, std = config.normalisation
    return v2.Compose(
        [
            v2.Resize(config.resize, antialias=True),
            v2.RandomResizedCrop(config.image_size, scale=aug.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(aug.flip_p),
            v2.RandomAffine(
                degrees=aug.rotation_degrees,
                translate=(aug.translate, aug.translate),
                scale=aug.affine_scale,
            ),
            v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
            v2.GaussianBlur(_blur_kernel(aug.blur_sigma[1]), sigma=aug.blur_sigma),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([mean], [std]),
            _ToThreeChannels(),
        ]
    )


def eval_transform(config: ModelConfig):
    """Resize the shorter side, centre crop: the view used to embed images for retrieval."""
    mean, std = config.normalisation
    return v2.Compose(
        [
            v2.Resize(config.resize, antialias=True),
            v2.CenterCrop(config.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([mean], [std]),
            _ToThreeChannels(),
        ]
    )


class _ToThreeChannels(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(3, *x.shape[-2:]) if x.shape[-3] == 1 else x
