"""`convirt pretrain-text`: masked-language-model pretraining of the text tower on report text.

The packaged text encoders were trained on general web sentences. A few minutes of continued MLM
pretraining on radiology and caption text adapts the whole tower to the domain before ConVIRT
starts, including the embeddings and lower layers that ConVIRT then freezes. The output is a
plain transformers folder (config.json, model.safetensors, tokenizer files) that
`--set model.text_encoder=DIR` loads like any BERT folder.

Only the train split of each manifest is read: no dev or test text (not even a sentence of one)
reaches the tower, so dev retrieval scores stay honest.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from convirt.bundle import fingerprint_state, replace_dir
from convirt.config import ModelConfig
from convirt.encoders import text_encoder_path
from convirt.manifest import ManifestError, iter_manifest_rows
from convirt.paths import (
    DATA_ROOT_ENV,
    PAIRED_DATASETS,
    MissingWeightsError,
    data_root,
    default_iu_reports,
    default_manifests,
)
from convirt.sentences import report_sentences

log = logging.getLogger(__name__)

INFO_NAME = "pretrain_text.json"
IU_REPORT_FIELDS = ("findings", "impression")  # the report text; indication is history, mesh labels
MAX_WORDS = 40  # longer sentences become chunks of this many words (about 55 wordpieces)
HELDOUT_FRACTION = 0.05
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


# --- the corpus --------------------------------------------------------------------------------


def report_corpus(
    manifests: list[Path],
    split: str = "train",
    iu_reports: Path | None = None,
    max_words: int = MAX_WORDS,
) -> list[str]:
    """Distinct sentences (or chunks of at most max_words words) to pretrain on, in a fixed order.

    From each manifest: the texts of `split` rows only. A text that also appears in another split
    is dropped, and so is any sentence that occurs in another split's text: the tower must never
    have seen dev or test wording. The iu-reports have no split (no images, not used by ConVIRT's
    manifests), so all of them are added, minus those held-out sentences too.
    """
    texts: list[str] = []
    held_out_texts: set[str] = set()
    for manifest in manifests:
        mine, others = _manifest_texts(Path(manifest), split)
        texts += mine
        held_out_texts |= others
    if iu_reports is not None:
        texts += _iu_report_texts(Path(iu_reports))
    forbidden = {
        piece
        for text in held_out_texts
        for sentence in report_sentences(text)
        for piece in (sentence, *_chunks(sentence, max_words))
    }
    corpus = _unique(
        chunk
        for text in texts
        if text not in held_out_texts
        for sentence in report_sentences(text)
        if sentence not in forbidden
        for chunk in _chunks(sentence, max_words)
    )
    return [c for c in corpus if c not in forbidden]


def _manifest_texts(manifest: Path, split: str) -> tuple[list[str], set[str]]:
    """(distinct texts of `split`, every text of the other splits) of one manifest."""
    rows = iter_manifest_rows(manifest)
    first = next(rows, None)
    if first is None:
        raise ManifestError(f"{manifest} has no rows")
    for column in ("text", "split"):
        if column not in first:
            raise ManifestError(
                f"{manifest} has no {column!r} column; its columns are: {', '.join(first)}"
            )
    mine: list[str] = []
    others: set[str] = set()
    for row in [first, *rows]:
        text = row["text"].strip()
        if text and row["split"] == split:
            mine.append(text)
        elif text:
            others.add(text)
    return _unique(mine), others


def _iu_report_texts(path: Path) -> list[str]:
    """The findings and impression of every iu-reports report, as separate texts."""
    if not path.is_file():
        raise ManifestError(f"iu-reports file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in IU_REPORT_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path} has no {missing[0]!r} column (not an iu-reports file?)")
        return [
            row[c].strip() for row in reader for c in IU_REPORT_FIELDS if (row[c] or "").strip()
        ]


def _chunks(sentence: str, max_words: int) -> Iterator[str]:
    """The sentence itself, or consecutive pieces of max_words words when it is longer."""
    words = sentence.split()
    for start in range(0, len(words), max_words):
        yield " ".join(words[start : start + max_words])


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def split_heldout(corpus: list[str], seed: int, limit: int = 256) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded 5% slice (at most `limit` sentences) kept out of training."""
    if len(corpus) < 2:
        raise ValueError(
            f"the text corpus has {len(corpus)} sentence(s); pretraining needs at least 2 "
            "(check the manifests' text and split columns)"
        )
    count = min(limit, max(1, round(len(corpus) * HELDOUT_FRACTION)))
    chosen = set(random.Random(seed).sample(range(len(corpus)), count))
    train = [s for i, s in enumerate(corpus) if i not in chosen]
    heldout = [s for i, s in enumerate(corpus) if i in chosen]
    return train, heldout


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
    target = _device(device)
    model, tokenizer = _load_mlm(base_path)
    model.to(target)
    encode = _Encoder(tokenizer, settings)
    heldout_batches = encode.fixed_batches(heldout, settings.seed + 1)
    before = heldout_loss(model, heldout_batches, target)
    losses, seconds = _train(model, encode, train_set, settings, target, progress)
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report (and a 'corrupted checkpoint' warning) for the MLM head
    the base folder lacks: expected here, so it is replaced by one log line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_mlm(base_path: Path) -> tuple[torch.nn.Module, object]:
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


class _Encoder:
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
    encode: _Encoder,
    sentences: list[str],
    settings: PretrainTextConfig,
    device: torch.device,
    progress: bool,
) -> tuple[list[float], float]:
    """The loop: until max_steps or the time budget is spent. Returns per-step losses, seconds."""
    from tqdm import tqdm

    examples = encode.tokenize(sentences)
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    budget = settings.minutes * 60
    losses: list[float] = []
    model.train()
    bar = tqdm(total=settings.max_steps, desc="text MLM", unit="step", disable=not progress)
    started = time.monotonic()
    for indices in _batches(len(examples), settings.batch_size, settings.seed):
        batch = encode.collator([examples[i] for i in indices])
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
    encoder = _encoder_for_saving(model, base_path)
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


def _encoder_for_saving(model: torch.nn.Module, base_path: Path) -> torch.nn.Module:
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


# --- command line ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convirt pretrain-text",
        description=(
            "Adapt the text encoder to medical report language before ConVIRT training.\n\n"
            "Continues its masked-language-model pretraining on the sentences of the manifests'\n"
            "train split (never dev text) and, by default, the iu-reports chest X-ray reports.\n"
            "Writes OUT as a transformers folder (encoder weights without the MLM head,\n"
            f"tokenizer, {INFO_NAME}) for `convirt train --set model.text_encoder=OUT`.\n"
            "5% of the sentences (at most --heldout) are held out: the JSON summary printed at\n"
            "the end gives their MLM loss before and after."
        ),
        epilog=(
            "example: convirt pretrain-text --out runs/minilm-med --minutes 4\n"
            f"Manifests default to {', '.join(PAIRED_DATASETS)} under ${DATA_ROOT_ENV} "
            f"(now {data_root()}). An OUT that already holds a finished pretraining is refused "
            "(reuse it as it is) unless --force replaces it."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = PretrainTextConfig()
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--base", default="packaged",
        help="text encoder to start from: packaged (MiniLM), mpnet or a transformers folder "
        "(default: packaged)",
    )  # fmt: skip
    parser.add_argument(
        "--manifest", action="append", type=Path, dest="manifests",
        help="CSV or JSONL with text and split columns; repeat to combine (default: see below)",
    )  # fmt: skip
    parser.add_argument(
        "--no-iu-reports", action="store_true", help="leave out the iu-reports corpus"
    )
    parser.add_argument(
        "--minutes", type=float, default=defaults.minutes,
        help=f"time budget of the training loop (default: {defaults.minutes:g})",
    )  # fmt: skip
    parser.add_argument("--max-steps", type=int, help="also stop after this many steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size,
        help=f"sentences per step (default: {defaults.batch_size})",
    )  # fmt: skip
    parser.add_argument(
        "--lr", type=float, default=defaults.lr,
        help=f"peak learning rate (default: {defaults.lr:g})",
    )  # fmt: skip
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps,
        help="linear LR warm-up; then constant, or with --max-steps a linear decay to 0 "
        f"(default: {defaults.warmup_steps})",
    )  # fmt: skip
    parser.add_argument(
        "--max-tokens", type=int, default=defaults.max_tokens,
        help=f"tokens per sentence, longer ones are cut (default: {defaults.max_tokens})",
    )  # fmt: skip
    parser.add_argument(
        "--heldout", type=int, default=defaults.heldout,
        help=f"sentences kept out to score the MLM loss (at most 5%%; default: {defaults.heldout})",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads", type=int,
        help="torch CPU threads (default: torch's; 1 is faster when other jobs share the cores)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=defaults.seed,
        help="seeds head init, batch order, masks and the held-out slice (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier pretraining in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        settings = PretrainTextConfig(
            minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size,
            lr=args.lr, warmup_steps=args.warmup_steps, max_tokens=args.max_tokens,
            heldout=args.heldout, iu_reports=not args.no_iu_reports, seed=args.seed,
        )  # fmt: skip
    except ValidationError as err:
        return _fail(_validation_message(err))
    if args.threads is not None:
        if args.threads < 1:
            return _fail("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        check_out_dir(args.out, args.force)
        corpus = _cli_corpus(args.manifests or default_manifests(), settings.iu_reports)
        result = pretrain_text(
            args.base, corpus, args.out, settings, progress=not args.no_progress,
            device=args.device, overwrite=args.force,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    summary = asdict(result) | {
        "out_dir": str(result.out_dir),
        "steps_per_second": round(result.steps / result.seconds, 2) if result.seconds else None,
        "use": f"--set model.text_encoder={result.out_dir}",
    }
    print(json.dumps(summary))
    return 0


def _cli_corpus(manifests: list[Path], iu_reports: bool) -> list[str]:
    missing = [m for m in manifests if not m.is_file()]
    if missing:
        raise FileNotFoundError(
            f"manifest not found: {missing[0]} (set {DATA_ROOT_ENV} or pass --manifest)"
        )
    iu_path = default_iu_reports() if iu_reports else None
    if iu_reports and iu_path is None:
        log.warning("iu-reports not found under %s: training on the manifests only", data_root())
    corpus = report_corpus(manifests, iu_reports=iu_path)
    if not corpus:
        raise ValueError(
            "the text corpus is empty: the manifests have no train rows with text "
            "(pass --manifest with a split column holding 'train')"
        )
    log.info("text corpus: %d sentences", len(corpus))
    return corpus


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def _fail(message: str) -> int:
    print(f"convirt pretrain-text: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
