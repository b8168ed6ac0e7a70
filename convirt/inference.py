"""Embedding images and texts with a trained model: used by evaluation, the index and the service."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .bundle import Bundle
from .transforms import eval_transform, pil_to_tensor


@dataclass
class TextEmbedding:
    vectors: np.ndarray  # N x d, L2-normalised, joint space
    truncated: list[bool]  # whether each text ran past the encoder's token limit


class Embedder:
    """Batched, no-grad embedding into L2-normalised numpy vectors."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", batch_size: int = 32):
        self.bundle = bundle
        self.model = bundle.model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.transform = eval_transform(bundle.config)
        self.max_tokens = bundle.config.max_text_tokens

    @property
    def dim(self) -> int:
        return self.bundle.config.projection_dim

    @property
    def image_feature_dim(self) -> int:
        return self.model.image_encoder.out_dim

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image to the eval view tensor (3xSxS float), ready to batch."""
        return self.transform(pil_to_tensor(image))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.bundle.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts, capped at max_tokens + 1 (enough to tell whether a text is truncated)."""
        encoded = self.bundle.tokenizer(
            list(texts), truncation=True, max_length=self.max_tokens + 1
        )
        return [len(ids) for ids in encoded["input_ids"]]

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> TextEmbedding:
        """Joint-space vectors u/|u| for each text (truncated at the token limit, and said so)."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenize(texts[start : start + self.batch_size])
            _, u = self.model.encode_text(
                batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            )
            chunks.append(F.normalize(u.float(), dim=-1).cpu())
        vectors = torch.cat(chunks).numpy() if chunks else np.zeros((0, self.dim), np.float32)
        truncated = [n > self.max_tokens for n in self.count_tokens(texts)] if texts else []
        return TextEmbedding(vectors, truncated)

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(h/|h|, v/|v|) for a preprocessed batch: encoder space and joint space."""
        h, v = self.model.encode_image(pixels.to(self.device))
        return (
            F.normalize(h.float(), dim=-1).cpu().numpy(),
            F.normalize(v.float(), dim=-1).cpu().numpy(),
        )

    def embed_images(self, images: Iterable[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        tensors = [self.preprocess(image) for image in images]
        if not tensors:
            empty = np.zeros((0, self.dim), np.float32)
            return np.zeros((0, self.image_feature_dim), np.float32), empty
        parts = [
            self.embed_pixels(torch.stack(tensors[i : i + self.batch_size]))
            for i in range(0, len(tensors), self.batch_size)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
