"""The masked-language model behind `convirt pretrain-text`: the base encoder with an MLM head,
masked batches, the loss over masked tokens, and the encoder taken back out for saving."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from convirt.paths import MissingWeightsError

if TYPE_CHECKING:
    from .pretrain_text import PretrainTextConfig

log = logging.getLogger(__name__)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a loading summary (and a 'corrupted checkpoint' warning) for the MLM head
    the base folder lacks: expected here, so it is replaced by one log line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_mlm(base_path: Path) -> tuple[torch.nn.Module, object]:
    """The base encoder with an MLM head (decoder tied to the word embeddings), and its tokenizer.

    Sentence-embedding folders such as the packaged MiniLM hold no MLM head: it is initialised
    fresh (seeded), which is why the first steps' loss starts near ln(vocab size).
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    with _quiet_transformers():
        model, info = AutoModelForMaskedLM.from_pretrained(base_path, output_loading_info=True)
    fresh = sorted(info.get("missing_keys", []))
    encoder_missing = [k for k in fresh if not _is_head_key(model, k)]
    if encoder_missing:
        raise MissingWeightsError(
            f"{base_path} lacks encoder weights ({', '.join(encoder_missing[:3])}...): it is not a "
            "pretrained model folder"
        )
    if fresh:
        log.info("%s has no MLM head: initialising one (%d tensors)", base_path, len(fresh))
    return model, AutoTokenizer.from_pretrained(base_path)


def _is_head_key(model: torch.nn.Module, key: str) -> bool:
    return not key.startswith(model.base_model_prefix + ".") and not key.startswith(
        tuple(name + "." for name, _ in model.base_model.named_children())
    )


class MaskedBatches:
    """Tokenises sentences and masks them into MLM batches."""

    def __init__(self, tokenizer, settings: PretrainTextConfig):
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer = tokenizer
        self.settings = settings
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=settings.mask_probability, seed=settings.seed
        )

    def tokenize(self, sentences: list[str]) -> list[dict]:
        encoded = self.tokenizer(
            sentences,
            truncation=True,
            max_length=self.settings.max_tokens,
            return_special_tokens_mask=True,
            return_token_type_ids=False,
        )
        return [
            dict(zip(encoded.keys(), values, strict=True))
            for values in zip(*encoded.values(), strict=True)
        ]

    def fixed_batches(self, sentences: list[str], seed: int) -> list[dict[str, torch.Tensor]]:
        """Masked batches made once with their own seed: scoring them twice compares like with
        like."""
        from transformers import DataCollatorForLanguageModeling

        collator = DataCollatorForLanguageModeling(
            self.tokenizer, mlm_probability=self.settings.mask_probability, seed=seed
        )
        examples = self.tokenize(sentences)
        size = self.settings.batch_size
        return [collator(examples[i : i + size]) for i in range(0, len(examples), size)]


def mlm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy over the masked tokens only. The head (a vocabulary-sized projection) runs on
    those ~15% of positions instead of all of them: on a CPU it is about half the cost of a step."""
    labels = batch["labels"]
    picked = labels != -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = _head(model)
    if head is None:
        logits = model(**inputs).logits[picked]
    else:
        logits = head(model.base_model(**inputs).last_hidden_state[picked])
    return torch.nn.functional.cross_entropy(logits.float(), labels[picked], reduction=reduction)


def _head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The MLM head when it is one module beside the encoder (BERT's cls, MPNet's lm_head)."""
    heads = [m for name, m in model.named_children() if name != model.base_model_prefix]
    return heads[0] if len(heads) == 1 else None


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> float:
    """Mean cross-entropy per masked token over all batches (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        total += mlm_loss(model, batch, reduction="sum").item()
        count += int((batch["labels"] != -100).sum())
    model.train(was_training)
    return total / count if count else float("nan")


def encoder_for_saving(model: torch.nn.Module, base_path: Path) -> torch.nn.Module:
    """The base architecture (AutoModel, as build_text_encoder loads it) holding the trained
    weights. The MLM model's encoder has no pooler; the base's is kept so loading the folder
    reports no missing weights (ConVIRT drops the pooler anyway)."""
    from transformers import AutoModel

    with _quiet_transformers():
        encoder = AutoModel.from_pretrained(base_path)
    trained = {k: v.detach().cpu() for k, v in model.base_model.state_dict().items()}
    missing, unexpected = encoder.load_state_dict(trained, strict=False)
    left_out = [k for k in missing if not k.startswith("pooler.")]
    if left_out or unexpected:
        raise RuntimeError(
            f"trained encoder does not match {base_path}: missing {left_out[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return encoder
