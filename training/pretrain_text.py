"""`convirt pretrain-text`: masked-language-model pretraining of the text tower on report text.

The packaged text encoders were trained on general web sentences. A few minutes of continued MLM
pretraining on radiology and caption text adapts the whole tower to the domain before ConVIRT
starts, including the embeddings and lower layers that ConVIRT then freezes. The output is a
plain transformers folder (config.json, model.safetensors, tokenizer files) that
`--set model.text_encoder=DIR` loads like any BERT folder.

Only the train split of each manifest is read: no dev or test text (not even a sentence of one)
reaches the tower, so dev retrieval scores stay honest.

Rooms: training/text_corpus.py (which sentences), training/mlm.py (the masked-LM model and its
loss), this module (the run: settings, loop, atomic save), training/pretrain_text_cli.py (the
command line).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from convirt.bundle import fingerprint_state, replace_dir
from convirt.cli_options import resolve_device
from convirt.config import ModelConfig
from convirt.encoders import text_encoder_path

from .mlm import MaskedBatches, encoder_for_saving, heldout_loss, load_mlm, mlm_loss
from .text_corpus import split_heldout

INFO_NAME = "pretrain_text.json"
LOSS_WINDOW = 20  # first/last losses are means over at most this many steps


class PretrainTextConfig(BaseModel):
    """Settings of one MLM pretraining run; recorded in OUT/pretrain_text.json."""

    model_config = ConfigDict(extra="forbid")

    # Time budget of the training loop in minutes, checked after every step (loading, held-out
    # scoring and saving come on top: a few seconds for MiniLM).
    minutes: float = Field(5.0, gt=0)
    # Also stop after this many optimiser steps; with it the LR decays linearly to 0 at the end.
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(5e-5, gt=0)
    # Linear LR warm-up from 0; then constant (time budget only) or linear decay (max_steps).
    warmup_steps: int = Field(50, ge=0)
    # AdamW weight decay, applied to matrices only (not to biases and LayerNorm weights).
    weight_decay: float = Field(0.01, ge=0)
    # Share of tokens the collator selects for prediction (BERT: 15%, 80/10/10 mask/random/keep).
    mask_probability: float = Field(0.15, gt=0, lt=1)
    # Sentences are truncated to this many tokens (special tokens included).
    max_tokens: int = Field(64, ge=8, le=512)
    # Add the iu-reports chest X-ray reports (findings and impression) to the manifests' text.
    iu_reports: bool = True
    # Sentences kept out of training to score the MLM loss before and after (at most 5% of the
    # corpus); each is scored twice, so more costs time outside the budget.
    heldout: int = Field(256, ge=1)
    # Seeds the MLM head's initialisation, batch order, masking, dropout and the held-out slice.
    seed: int = 0


@dataclass
class PretrainResult:
    """What a run did. Losses are mean MLM cross-entropy per masked token (nats)."""

    out_dir: Path
    steps: int
    seconds: float  # the training loop alone
    train_loss_first: float  # mean over the first min(20, steps // 2 or 1) steps
    train_loss_last: float  # mean over as many last steps
    heldout_loss_before: float  # the held-out slice with fixed masks, before training
    heldout_loss_after: float  # the same slice and masks, after
    train_sentences: int = 0
    heldout_sentences: int = 0
    fingerprint: str = ""  # convirt.bundle.fingerprint_state of the saved encoder, pooler excluded


# --- training ----------------------------------------------------------------------------------


def read_pretrain_info(out_dir: Path) -> dict | None:
    """OUT/pretrain_text.json of a finished pretraining, or None when there is none."""
    path = Path(out_dir) / INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def pretrain_text(
    base: str,
    corpus: list[str],
    out_dir: Path,
    settings: PretrainTextConfig,
    progress: bool = True,
    device: str = "auto",
    overwrite: bool = False,
) -> PretrainResult:
    """Continue MLM pretraining of the text encoder `base` (a ModelConfig.text_encoder value) on
    `corpus`, and save the encoder (without its MLM head) and tokenizer to out_dir.

    Refuses (FileExistsError) an out_dir that holds anything, unless it is an earlier pretraining
    and `overwrite` is set; the folder is replaced atomically once training is done.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    base_path = text_encoder_path(ModelConfig(text_encoder=base))
    train_set, heldout = split_heldout(corpus, settings.seed, settings.heldout)
    started = time.monotonic()
    torch.manual_seed(settings.seed)  # the fresh MLM head's initialisation, dropout
    target = torch.device(resolve_device(device))
    model, tokenizer = load_mlm(base_path)
    model.to(target)
    masking = MaskedBatches(tokenizer, settings)
    heldout_batches = masking.fixed_batches(heldout, settings.seed + 1)
    before = heldout_loss(model, heldout_batches, target)
    losses, seconds = _train(model, masking, train_set, settings, target, progress)
    after = heldout_loss(model, heldout_batches, target)
    window = min(LOSS_WINDOW, max(1, len(losses) // 2))
    result = PretrainResult(
        out_dir=out_dir,
        steps=len(losses),
        seconds=round(seconds, 2),
        train_loss_first=sum(losses[:window]) / window,
        train_loss_last=sum(losses[-window:]) / window,
        heldout_loss_before=before,
        heldout_loss_after=after,
        train_sentences=len(train_set),
        heldout_sentences=len(heldout),
    )
    info = {"base": base, "base_path": str(base_path), "settings": settings.model_dump()}
    result.fingerprint = _save(model, base_path, tokenizer, out_dir, info, result, started)
    return result


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to train into a folder that holds something (before minutes of work, not after)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    info = read_pretrain_info(out_dir)
    if info is not None and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a finished text pretraining ({info.get('steps')} steps "
            f"from {info.get('base')!r}): use it with --set model.text_encoder={out_dir}, or "
            "pass --force to replace it"
        )
    if info is None and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and is not a text pretraining folder: choose another --out"
        )


def _optimizer(model: torch.nn.Module, settings: PretrainTextConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )


def lr_factor(step: int, settings: PretrainTextConfig) -> float:
    """Linear warm-up, then constant, or with max_steps a linear decay to 0 at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    if settings.max_steps is None:
        return 1.0
    remaining = settings.max_steps - step
    return max(0.0, remaining / max(1, settings.max_steps - settings.warmup_steps))


def _batches(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless epochs of shuffled indices from a seeded generator; a short last batch is kept."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, batch_size):
            yield order[start : start + batch_size]


def _train(
    model: torch.nn.Module,
    masking: MaskedBatches,
    sentences: list[str],
    settings: PretrainTextConfig,
    device: torch.device,
    progress: bool,
) -> tuple[list[float], float]:
    """The loop: until max_steps or the time budget is spent. Returns per-step losses, seconds."""
    from tqdm import tqdm

    examples = masking.tokenize(sentences)
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    budget = settings.minutes * 60
    losses: list[float] = []
    model.train()
    bar = tqdm(total=settings.max_steps, desc="text MLM", unit="step", disable=not progress)
    started = time.monotonic()
    for indices in _batches(len(examples), settings.batch_size, settings.seed):
        batch = masking.collator([examples[i] for i in indices])
        if not (batch["labels"] != -100).any():
            continue  # nothing masked (tiny batch of short sentences): no loss to learn from
        loss = mlm_loss(model, {k: v.to(device) for k, v in batch.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.update()
        if len(losses) % 10 == 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        spent = time.monotonic() - started
        if len(losses) == settings.max_steps or spent >= budget:
            break
    bar.close()
    return losses, time.monotonic() - started


# --- saving ------------------------------------------------------------------------------------


def _save(
    model: torch.nn.Module,
    base_path: Path,
    tokenizer,
    out_dir: Path,
    info: dict,
    result: PretrainResult,
    started: float,
) -> str:
    """Write the encoder, tokenizer and pretrain_text.json into a staging folder beside out_dir,
    then rename it into place: a kill mid-save leaves no half folder. Returns the fingerprint."""
    encoder = encoder_for_saving(model, base_path)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
    fingerprint = fingerprint_state(state)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        encoder.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        summary = {k: v for k, v in asdict(result).items() if k != "out_dir"}
        info = info | summary | {"fingerprint": fingerprint}
        info["total_seconds"] = round(time.monotonic() - started, 2)
        (staging / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fingerprint
