"""The bidirectional contrastive loss of ConVIRT (Zhang et al. 2020, eq. 2-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def convirt_loss(
    v: torch.Tensor, u: torch.Tensor, temperature: float = 0.1, image_weight: float = 0.75
) -> torch.Tensor:
    """L = mean_i [ lambda * l_i(v->u) + (1 - lambda) * l_i(u->v) ] with cosine similarity / tau.

    v, u: B x d image and text projections of B pairs; row i of each is a true pair.
    """
    if v.shape != u.shape:
        raise ValueError(f"image and text batches differ: {tuple(v.shape)} vs {tuple(u.shape)}")
    logits = F.normalize(v.float(), dim=-1) @ F.normalize(u.float(), dim=-1).T / temperature
    targets = torch.arange(len(v), device=v.device)
    image_to_text = F.cross_entropy(logits, targets)  # l(v->u): each image picks its text
    text_to_image = F.cross_entropy(logits.T, targets)  # l(u->v): each text picks its image
    return image_weight * image_to_text + (1 - image_weight) * text_to_image
