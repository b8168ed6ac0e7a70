"""The bidirectional contrastive loss of ConVIRT (Zhang et al. 2020, eq. 2-4).

Optionally with false negatives masked: when several images of one case (or one report) fall in a
batch, the plain loss pushes each image away from its sibling's report although that report
describes it too. `groups` names such pairs, and they leave both softmax denominators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_group_mask(groups: torch.Tensor) -> torch.Tensor:
    """B x B bool: pairs (i, j), i != j, that share a group. `groups` is B ids, or G x B ids (one
    row per grouping, e.g. report and case): pairs sharing any of them count."""
    rows = groups if groups.dim() == 2 else groups[None]
    same = (rows[:, :, None] == rows[:, None, :]).any(dim=0)
    same.fill_diagonal_(False)
    return same


def convirt_loss(
    v: torch.Tensor,
    u: torch.Tensor,
    temperature: float | torch.Tensor = 0.1,
    image_weight: float = 0.75,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = mean_i [ lambda * l_i(v->u) + (1 - lambda) * l_i(u->v) ] with cosine similarity / tau.

    v, u: B x d image and text projections of B pairs; row i of each is a true pair.
    groups: optional ids (B, or G x B); pairs of one group are not negatives of each other.
    """
    if v.shape != u.shape:
        raise ValueError(f"image and text batches differ: {tuple(v.shape)} vs {tuple(u.shape)}")
    logits = F.normalize(v.float(), dim=-1) @ F.normalize(u.float(), dim=-1).T / temperature
    if groups is not None:
        logits = logits.masked_fill(same_group_mask(groups.to(logits.device)), float("-inf"))
    targets = torch.arange(len(v), device=v.device)
    image_to_text = F.cross_entropy(logits, targets)  # l(v->u): each image picks its text
    text_to_image = F.cross_entropy(logits.T, targets)  # l(u->v): each text picks its image
    return image_weight * image_to_text + (1 - image_weight) * text_to_image
