"""Embedding images and texts with a trained model: used by evaluation, the index and the service."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .bundle import Bundle
from .imageio import resize_shorter
from .transforms import eval_transform, pil_to_tensor

# Padded tokens one text forward pass aims at: past it, a longer chunk gains nothing on CPU.
# Measured on 2 cores with medpix report sentences (7-40 tokens): 32 at once 259 ms padded to the
# longest, 164 ms in chunks of 256 tokens, 406 ms one at a time.
TOKENS_PER_FORWARD = 256


@dataclass
class TextEmbedding:
    vectors: np.ndarray  # N x d, L2-normalised, joint space
    truncated: list[bool]  # whether each text ran past the encoder's token limit


class Embedder:
    """Batched, no-grad embedding into L2-normalised numpy vectors."""

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        text_encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        """text_encoder: (input_ids, attention_mask) -> u in place of the model's text tower
        (the int8 query encoder of convirt.quantize); images always use the model."""
        self.bundle = bundle
        self.model = bundle.model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.transform = eval_transform(bundle.config)
        self.max_tokens = bundle.config.max_text_tokens
        self.text_encoder = text_encoder

    @property
    def dim(self) -> int:
        return self.bundle.config.projection_dim

    @property
    def image_feature_dim(self) -> int:
        return self.model.image_encoder.out_dim

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image to the eval view tensor (3xSxS float), ready to batch.

        The same sequence as the image cache then the eval transform (shrink the shorter side to
        the resize side, centre crop), so an upload or an indexed file embeds exactly as the
        cached copy of it does in training and evaluation."""
        return self.transform(pil_to_tensor(resize_shorter(image, self.bundle.config.resize)))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> TextEmbedding:
        """Joint-space vectors u/|u| for each text (truncated at the token limit, and said so).

        Texts are encoded shortest first, in chunks padded to their own longest text: a batch of
        mixed lengths padded to its longest wastes most of its compute on padding.
        """
        if not texts:
            return TextEmbedding(np.zeros((0, self.dim), np.float32), [])
        encoded, truncated = self._tokenize(texts)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        vectors = np.zeros((len(texts), self.dim), np.float32)
        for chunk in length_chunks(lengths, self.batch_size, TOKENS_PER_FORWARD):
            batch = self.bundle.tokenizer.pad(
                {key: [encoded[key][i] for i in chunk] for key in ("input_ids", "attention_mask")},
                return_tensors="pt",
            )
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            if self.text_encoder is not None:
                u = self.text_encoder(ids, mask)
            else:
                _, u = self.model.encode_text(ids, mask)
            vectors[chunk] = F.normalize(u.float(), dim=-1).cpu().numpy()
        return TextEmbedding(vectors, truncated)

    def _tokenize(self, texts: Sequence[str]) -> tuple[dict[str, list], list[bool]]:
        """Token ids and masks cut at max_tokens, and whether each text was cut. Texts are
        tokenized once with room for one more token, which tells the long ones; only those are
        tokenized again at the limit (so the tokenizer places its closing special tokens)."""
        tokenizer = self.bundle.tokenizer
        encoded = tokenizer(list(texts), truncation=True, max_length=self.max_tokens + 1)
        encoded = {key: list(encoded[key]) for key in ("input_ids", "attention_mask")}
        long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > self.max_tokens]
        if long:
            cut = tokenizer([texts[i] for i in long], truncation=True, max_length=self.max_tokens)
            for key in encoded:
                for i, row in zip(long, cut[key], strict=True):
                    encoded[key][i] = row
        cut_rows = set(long)
        return encoded, [i in cut_rows for i in range(len(texts))]

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


def length_chunks(lengths: Sequence[int], max_batch: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped shortest first, each group at most max_batch long and, once it holds more
    than one text, at most max_tokens padded tokens (count x its longest)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = (len(current) + 1) * lengths[index]
        if current and (len(current) == max_batch or padded > max_tokens):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks
