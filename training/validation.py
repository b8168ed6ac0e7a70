"""What each epoch measures on the dev splits: the loss, and the retrieval users will get.

The validation loss alone picks the wrong epoch for retrieval (docs/results.md: run A's epoch 3 by
loss scored medpix R@10 0.260, its last epoch 0.366). So every epoch also scores text->image
recall@10 on each dev split, with `convirt eval`'s protocol (each distinct report queries that
split's images; a hit when an image paired with it is in the top 10), and the run keeps the epoch
with the best mean over the splits (`select_by: retrieval`).

Both come from one pass: the images are embedded once (eval view, from the image cache); the loss
takes fixed batches of (image, sampled sentence) pairs as before, the recall the whole reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from convirt.loss import convirt_loss

from .data import Collator, PairDataset
from .retrieval_scores import recall_at_k

RECALL_K = 10


@dataclass
class DevSplit:
    """One manifest's validation pairs, under a short name (the dataset folder: medpix...)."""

    name: str
    dataset: PairDataset


@dataclass
class Validation:
    loss: float  # mean over all dev pairs, as the training loss is computed
    recall: dict[str, float] = field(default_factory=dict)  # text->image R@10 per dev split

    @property
    def mean_recall(self) -> float:
        values = [r for r in self.recall.values() if r == r]
        return float(np.mean(values)) if values else float("nan")

    def score(self, select_by: str) -> float:
        """Higher is better, whatever the criterion: the epoch with the highest score is kept."""
        return -self.loss if select_by == "val_loss" else self.mean_recall


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    splits: Sequence[DevSplit],
    collate: Collator,
    batch_size: int,
    temperature: float,
    image_weight: float,
    loader: Callable[..., DataLoader],
    device: torch.device,
    prepare_pixels: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> Validation:
    """Loss and recall on every dev split; the model is put in eval mode."""
    model.eval()
    total, count, recall = 0.0, 0, {}
    for split in splits:
        if len(split.dataset) == 0:
            continue
        v, u = _embed_pairs(model, split.dataset, batch_size, loader, device, prepare_pixels)
        for start in range(0, len(v), batch_size):
            if len(v[start : start + batch_size]) >= 2:  # a batch of one has no negatives
                batch_v, batch_u = v[start : start + batch_size], u[start : start + batch_size]
                loss = convirt_loss(batch_v, batch_u, temperature, image_weight)
                total += loss.item() * len(batch_v)
                count += len(batch_v)
        reports = _embed_reports(model, split.dataset, collate, batch_size, device)
        recall[split.name] = text_to_image_recall(reports, v, split.dataset.table.text_ids)
    return Validation(total / count if count else float("nan"), recall)


def text_to_image_recall(
    report_vectors: torch.Tensor, image_vectors: torch.Tensor, text_ids: np.ndarray
) -> float:
    """R@10 of each distinct report (row j = text id j) over the images (image i shows report
    text_ids[i])."""
    scores = (
        F.normalize(report_vectors.float(), dim=-1) @ F.normalize(image_vectors.float(), dim=-1).T
    )
    relevant = np.arange(len(report_vectors))[:, None] == np.asarray(text_ids)[None, :]
    return recall_at_k(scores.float().numpy(), relevant, RECALL_K)  # float: under bf16 autocast


def _embed_pairs(model, dataset, batch_size, loader, device, prepare_pixels):
    """Image projections (eval view) and sampled-sentence projections of every pair, in order."""
    keys = [(0, i) for i in range(len(dataset))]
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    images, texts = [], []
    for batch in loader(dataset, batch_sampler=batches):
        pixels = prepare_pixels(batch["pixels"].to(device))
        v, u = model(pixels, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        images.append(v.float().cpu())
        texts.append(u.float().cpu())
    return torch.cat(images), torch.cat(texts)


def _embed_reports(model, dataset: PairDataset, collate: Collator, batch_size, device):
    """Each distinct report, whole (truncated to the model's token limit), as eval embeds it."""
    vectors = []
    texts = dataset.table.texts
    for start in range(0, len(texts), batch_size):
        tokens = collate.tokenize(texts[start : start + batch_size])
        _, u = model.encode_text(
            tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        )
        vectors.append(u.float().cpu())
    return torch.cat(vectors)
